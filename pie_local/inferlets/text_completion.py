"""Continue a prompt as raw text (no chat template); only the generated text is output."""

from __future__ import annotations

from pie_local import Param, SamplingParams

NAME = "text-completion"
DESCRIPTION = "Continue a prompt as raw text; writes only the generated text (pipeable)."
PARAMETERS = {
    "prompt": Param(str, required=True, help="text to continue"),
    "max_tokens": Param(int, default=128, help="tokens to generate at most"),
    "temperature": Param(float, default=0.0, help="0 = greedy"),
    "top_p": Param(float, default=1.0, help="nucleus sampling: keep the top tokens of this probability mass"),
    "top_k": Param(int, default=0, help="keep the k most likely tokens (0 = all)"),
    "seed": Param(int, default=None, help="seed for reproducible sampling"),
    "stop": Param(list, default=None, help='stop strings, as JSON: \'["\\n\\n"]\''),
    "heal": Param(bool, default=False, help="token healing: let the first token span the prompt's last one"),
}


async def main(rt, args):
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    ctx = rt.context()
    ctx.fill(args.prompt)
    async for piece in ctx.stream(sampling, max_tokens=args.max_tokens, stop=args.stop, heal=args.heal):
        rt.emit(piece)
    return ctx.last.text
