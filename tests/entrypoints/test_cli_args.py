"""``ferry serve`` accepts a vLLM command line; ``LLM(...)`` accepts vLLM's keyword names; both map in one place."""
import dataclasses

import pytest

from ferry.engine.config import EngineConfig
from ferry.engine.entrypoints import cli
from ferry.engine.entrypoints import llm as llm_mod
from ferry.engine.entrypoints.args import canonical_kwargs, keyword_aliases
from ferry.engine.server.config import ServerConfig

VLLM_LINE = ["serve", "random:tiny", "--max-num-seqs", "8", "--tensor-parallel-size", "2",
             "--gpu-memory-utilization", "0.85", "--swap-space", "4", "--served-model-name", "my-model",
             "--api-key", "k1", "--max-model-len", "1024", "--block-size", "32", "--dtype", "float32",
             "--host", "0.0.0.0", "--port", "8001", "--uvicorn-log-level", "warning"]


def _serve(argv):
    return cli.serve_configs(cli.build_parser().parse_args(argv))


def test_vllm_serve_command_line_maps_onto_ferry_settings():
    ec, sc = _serve(VLLM_LINE)
    assert (ec.model, ec.max_batch, ec.tensor_parallel, ec.gpu_memory_utilization, ec.swap_space) == \
        ("random:tiny", 8, 2, 0.85, 4.0)
    assert (ec.max_model_len, ec.page_size, ec.dtype) == (1024, 32, "float32")
    assert (sc.served_model_name, sc.api_key, sc.host, sc.port, sc.log_level) == \
        ("my-model", "k1", "0.0.0.0", 8001, "warning")
    # Ferry's own spellings give the same settings (positive control of the aliasing)
    ec2, sc2 = _serve(["serve", "--model", "random:tiny", "--max-batch", "8", "--tensor-parallel", "2",
                       "--gpu-memory-utilization", "0.85", "--swap-space", "4", "--served-model-name", "my-model",
                       "--api-key", "k1", "--max-model-len", "1024", "--page-size", "32", "--dtype", "float32",
                       "--host", "0.0.0.0", "--port", "8001", "--log-level", "warning"])
    assert (ec2, sc2) == (ec, sc)


def test_model_positional_or_flag_anywhere_on_the_line():
    assert _serve(["serve", "m.gguf"])[0].model == "m.gguf"
    assert _serve(["serve", "--max-num-seqs", "2", "m.gguf"])[0].model == "m.gguf"
    assert _serve(["serve", "--model", "m.gguf"])[0].model == "m.gguf"
    assert _serve(["serve", "m.gguf", "--model", "m.gguf"])[0].model == "m.gguf"
    assert _serve(["serve"])[0].model is None                         # the default model
    with pytest.raises(ValueError, match="two models"):
        _serve(["serve", "a.gguf", "--model", "b.gguf"])
    assert _serve(["serve", "-tp", "4"])[0].tensor_parallel == 4
    assert _serve(["serve", "--num-gpu-blocks-override", "100"])[0].num_pages == 100


def test_help_groups_flags(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    sections = {}
    current = None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = line[:-1]
            sections[current] = ""
        elif current:
            sections[current] += line + "\n"
    for group, flags in {"model": ["--model", "--max-model-len", "--dtype"],
                         "memory": ["--gpu-memory-utilization", "--swap-space", "--block-size"],
                         "scheduling": ["--max-num-seqs", "--scheduler"],
                         "parallelism": ["--tensor-parallel-size"],
                         "server": ["--api-key", "--served-model-name", "--host", "--metrics-require-api-key"]
                         }.items():
        for flag in flags:
            assert flag in sections[group], (group, flag)


def test_every_alias_resolves_to_a_field_and_keywords_map_in_one_place():
    aliases = keyword_aliases(EngineConfig)
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    assert {"max_num_seqs": "max_batch", "tensor_parallel_size": "tensor_parallel", "block_size": "page_size",
            "num_gpu_blocks_override": "num_pages"}.items() <= aliases.items()
    assert set(aliases.values()) <= names
    kw = canonical_kwargs(EngineConfig, {"tensor_parallel_size": 2, "max_num_seqs": 8, "swap_space": 1.5,
                                         "gpu_memory_utilization": 0.7, "max_model_len": 512})
    assert kw == {"tensor_parallel": 2, "max_batch": 8, "swap_space": 1.5, "gpu_memory_utilization": 0.7,
                  "max_model_len": 512}
    with pytest.raises(ValueError, match="max_batch given twice"):
        canonical_kwargs(EngineConfig, {"max_batch": 4, "max_num_seqs": 8})


def test_llm_constructor_takes_vllm_names(monkeypatch):
    seen = []

    class _Engine:
        def __init__(self, config):
            seen.append(config)
            self.tokenizer = None

    monkeypatch.setattr(llm_mod, "LLMEngine", _Engine)
    llm_mod.LLM("random:tiny", tensor_parallel_size=2, max_num_seqs=8, gpu_memory_utilization=0.8,
                swap_space=2, block_size=32)
    assert seen[-1] == EngineConfig(model="random:tiny", tensor_parallel=2, max_batch=8,
                                    gpu_memory_utilization=0.8, swap_space=2, page_size=32)
    llm_mod.LLM("random:tiny", max_batch=8)                           # Ferry's names still work
    assert seen[-1].max_batch == 8
    with pytest.raises(TypeError):
        llm_mod.LLM("random:tiny", not_a_setting=1)
    with pytest.raises(ValueError, match="given twice"):
        llm_mod.LLM("random:tiny", max_batch=2, max_num_seqs=8)


def test_serve_warns_on_open_binding_and_reads_env_key(monkeypatch, capsys):
    """``ferry serve`` end to end up to uvicorn (engine and server stubbed): the warning and the key."""
    from ferry.engine.server import app as app_mod
    from tests.entrypoints.fake_engine import FakeEngine
    import ferry.engine.llm_engine as llm_engine_mod

    built = []
    monkeypatch.setattr(llm_engine_mod, "LLMEngine", lambda cfg: FakeEngine())

    class _Server:
        def run(self):
            pass

    def fake_make_server(app, aeng, host, port, *a):
        built.append((app, aeng, host, port))
        aeng.shutdown(timeout=1.0)
        return _Server()

    monkeypatch.setattr(app_mod, "make_uvicorn_server", fake_make_server)
    monkeypatch.delenv("FERRY_API_KEY", raising=False)
    assert cli.main(["serve", "random:tiny", "--host", "0.0.0.0", "--port", "8123"]) == 0
    assert "without an API key" in capsys.readouterr().err
    assert built[-1][2:] == ("0.0.0.0", 8123)
    assert cli.main(["serve", "random:tiny", "--host", "0.0.0.0", "--api-key", "k"]) == 0
    assert "without an API key" not in capsys.readouterr().err
    monkeypatch.setenv("FERRY_API_KEY", "from-env")
    assert ServerConfig().resolved_api_key() == "from-env"
    assert ServerConfig(api_key="flag").resolved_api_key() == "flag"
    assert cli.main(["serve", "random:tiny", "--host", "0.0.0.0"]) == 0
    assert "without an API key" not in capsys.readouterr().err
    from starlette.testclient import TestClient
    client = TestClient(built[-1][0])                                 # the app run_server built: env key
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200
    assert cli.main(["serve", "random:tiny"]) == 0                     # loopback: no warning
    assert "without an API key" not in capsys.readouterr().err
