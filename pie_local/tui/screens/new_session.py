"""The new-session dialog: title, model, inferlet and settings (system prompt, sampling)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, TextArea

from pie_local.tui.sessions_store import SessionSettings


class NewSessionScreen(ModalScreen[SessionSettings | None]):
    """Dismisses with validated SessionSettings, or None when cancelled."""

    CSS_PATH = "new_session.tcss"
    BINDINGS = [("escape", "cancel", "Cancel"), ("ctrl+s", "create", "Create")]

    def __init__(self, models: list[str], inferlets: list[str], default_model: str | None = None,
                 title: str = "New chat") -> None:
        super().__init__()
        self.models = models
        self.inferlets = inferlets or ["chat"]
        self.default_model = default_model if default_model in models else (models[0] if models else None)
        self.default_title = title

    def compose(self) -> ComposeResult:
        with Vertical(id="form"):
            yield Label("New session", classes="heading")
            with Grid(id="fields"):
                yield Label("Title")
                yield Input(self.default_title, id="title", compact=True)
                yield Label("Model")
                yield Select([(m, m) for m in self.models], id="model", allow_blank=self.default_model is None,
                             value=self.default_model if self.default_model else Select.NULL,
                             prompt="no model installed", compact=True)
                yield Label("Inferlet")
                yield Select([(n, n) for n in self.inferlets], id="inferlet", allow_blank=False, compact=True,
                             value="chat" if "chat" in self.inferlets else self.inferlets[0])
                yield Label("Temperature")
                yield Input("0.7", id="temperature", type="number", compact=True)
                yield Label("Top-p")
                yield Input("0.95", id="top_p", type="number", compact=True)
                yield Label("Max tokens")
                yield Input("512", id="max_tokens", type="integer", compact=True)
            yield Label("System prompt")
            yield TextArea("", id="system_prompt", compact=True)
            yield Label("", id="error")
            with Horizontal(id="buttons"):
                yield Button("Create", variant="primary", id="create")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#title", Input).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "create":
            self.action_create()
        else:
            self.dismiss(None)

    def action_create(self) -> None:
        try:
            settings = self._read()
        except ValueError as exc:
            self.query_one("#error", Label).update(str(exc))
            return
        self.dismiss(settings)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def _read(self) -> SessionSettings:
        model = self.query_one("#model", Select).value
        if model is Select.NULL or model is None:
            raise ValueError("no model to chat with: install one on the Models screen (press 2)")
        return SessionSettings(
            title=self.query_one("#title", Input).value,
            model=str(model),
            inferlet=str(self.query_one("#inferlet", Select).value),
            system_prompt=self.query_one("#system_prompt", TextArea).text.strip(),
            temperature=_number(self, "temperature", float),
            top_p=_number(self, "top_p", float),
            max_tokens=_number(self, "max_tokens", int),
        )


def _number(screen: ModalScreen, field: str, kind: type) -> float | int:
    text = screen.query_one(f"#{field}", Input).value.strip()
    try:
        return kind(text)
    except ValueError:
        label = field.replace("_", " ")
        raise ValueError(f"{label} must be a number, got {text!r}") from None
