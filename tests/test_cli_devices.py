"""The device options (--gpu-layers, --rpc, --tensor-split) on every command that loads a model:
parsed the same everywhere, refused with a usage error when malformed, carried into the
DriverParams the engine loads with; the placement table of `show`; `worker`'s address rule."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from driver_helpers import tiny_gguf
from rpc_helpers import free_port, worker_env

from pie_local.cli import build_parser, main
from pie_local.cli import run as run_cmd
from pie_local.server.config import ServerConfig
from pie_local.server.manager import ModelManager

LOADING = [["run", "text-completion"], ["chat"], ["serve"], ["doctor"], ["show", "m.gguf"]]


@pytest.mark.parametrize("command", LOADING, ids=lambda c: c[0])
def test_every_loading_command_parses_the_device_options(command: list[str]) -> None:
    args = build_parser().parse_args([command[0], "--gpu-layers", "5", "--rpc", "10.0.0.2:50052,h:1",
                                      "--tensor-split", "3,1", *command[1:]])
    assert (args.gpu_layers, args.rpc, args.tensor_split) == (5, ("10.0.0.2:50052", "h:1"), (3.0, 1.0))
    default = build_parser().parse_args(command)
    assert (default.gpu_layers, default.rpc, default.tensor_split) == (-1, (), ())
    assert build_parser().parse_args([command[0], "--gpu-layers", "auto", *command[1:]]).gpu_layers == -1


@pytest.mark.parametrize("option", [["--gpu-layers", "-2"], ["--gpu-layers", "many"], ["--rpc", "nohost"],
                                    ["--rpc", "h:99999"], ["--tensor-split", "1,x"], ["--tensor-split", "0,0"]])
def test_malformed_device_options_are_usage_errors(option: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["run", *option, "text-completion"])
    assert exit_.value.code == 2
    assert option[0] in capsys.readouterr().err


def test_run_loads_with_the_device_options() -> None:
    args = build_parser().parse_args(["run", "--gpu-layers", "7", "--rpc", "127.0.0.1:5", "--threads", "3",
                                      "text-completion"])
    driver = run_cmd.make_engine(args).config.driver
    assert (driver.n_gpu_layers, driver.rpc, driver.n_threads) == (7, ("127.0.0.1:5",), 3)


def test_serve_loads_every_model_with_the_device_options() -> None:
    config = ServerConfig(n_gpu_layers=4, rpc=("10.0.0.2:50052",), tensor_split=(1.0, 2.0))
    driver = ModelManager(config).engine_config().driver
    assert (driver.n_gpu_layers, driver.rpc, driver.tensor_split) == (4, ("10.0.0.2:50052",), (1.0, 2.0))


def test_device_options_with_a_named_server_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--server", "http://127.0.0.1:1", "--gpu-layers", "3", "text-completion", "--",
                 "--prompt", "x"]) == 2
    assert "--gpu-layers, --rpc and --tensor-split place a model loaded here" in capsys.readouterr().err


@pytest.mark.real_driver
def test_show_prints_the_placement(tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]) -> None:
    gguf = tiny_gguf(tmp_path_factory, "gemma3", "q8_0")  # 6 layers; no GPU or worker here: all on the CPU
    assert main(["show", str(gguf), "--context", "256"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("\nplacement\n"):].splitlines()[2:]
    assert len(table) == 1 and table[0].split()[0] == "CPU"
    # KV: 256 tokens x 6 layers x (K + V) x 2 KV heads x 32 x 2 bytes (f16) = 0.375 MiB
    assert "layers 0-5, embeddings, output head" in table[0] and "KV 0.4 MiB" in table[0]


@pytest.mark.real_driver
def test_show_refuses_more_layers_than_the_model_has(tmp_path_factory: pytest.TempPathFactory,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    gguf = tiny_gguf(tmp_path_factory, "gemma3", "q8_0")
    assert main(["show", str(gguf), "--gpu-layers", "3"]) == 2
    assert "no GPU or RPC worker to offload to" in capsys.readouterr().err


def test_worker_listens_beyond_loopback_only_when_told(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "no authentication" in err and "--allow-remote" in err


@pytest.mark.real_driver
def test_worker_warns_when_it_listens_beyond_loopback() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pie_local", "worker", "--host", "0.0.0.0", "--allow-remote",
                             "--port", str(port), "--threads", "1"], env=worker_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        line = ""
        while "WARNING" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
        assert "WARNING: listening on 0.0.0.0" in line and "no authentication" in line
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.mark.real_driver
def test_worker_refuses_a_port_in_use() -> None:
    from rpc_helpers import start_worker

    first = start_worker()
    try:
        second = subprocess.run([sys.executable, "-m", "pie_local", "worker", "--port", str(first.port)],
                                env=worker_env(), capture_output=True, text=True, timeout=60, check=False)
        assert second.returncode == 1
        assert f"something already listens on 127.0.0.1:{first.port}" in second.stderr
    finally:
        first.kill()
