"""Bad model directories get one MoEScopeError sentence from load_model (and so from ``moescope info``) that
names the path and what to change, never a traceback and never a silently random-initialised model.

Each case copies the bundled sample model (8 experts, safetensors) into ``tmp_path``, linking the files it
leaves alone, and breaks one thing.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.cli import main
from core.errors import MoEScopeError
from core.model import load_model

from .tiny_models import save_tiny

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "model"
WEIGHTS = (SAMPLE / "model.safetensors").read_bytes()
HEADER_LEN = struct.unpack("<Q", WEIGHTS[:8])[0]
HEADER = json.loads(WEIGHTS[8:8 + HEADER_LEN])


def sample_copy(tmp_path: Path, name: str = "model", **config_changes) -> Path:
    """The sample model with ``config_changes`` applied to config.json; other files are links to the originals
    (a test that rewrites one unlinks it first, so the sample itself is never touched)."""
    target = tmp_path / name
    target.mkdir()
    for file in SAMPLE.iterdir():
        if file.name != "config.json":
            (target / file.name).symlink_to(file)
    config = json.loads((SAMPLE / "config.json").read_text())
    config.update(config_changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


def replace(file: Path, data: bytes) -> None:
    file.unlink()
    file.write_bytes(data)


def refusal(source: Path, *fragments: str) -> str:
    """load_model's error for ``source``: one line that names the directory and holds every fragment."""
    with pytest.raises(MoEScopeError) as err:
        load_model(source)
    message = str(err.value)
    assert "\n" not in message, message
    assert str(source) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def with_header(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


# ----- 1. damaged safetensors ----------------------------------------------------------------------------------

def _truncated() -> bytes:
    return WEIGHTS[:len(WEIGHTS) // 2]


def _header_beyond_file() -> bytes:
    return struct.pack("<Q", 10 ** 9) + b'{"a": 1}'


def _garbage_header() -> bytes:
    return struct.pack("<Q", 16) + b"not json at all!" + WEIGHTS[8 + HEADER_LEN:]


def _data_too_short() -> bytes:
    return WEIGHTS[:8 + HEADER_LEN + 100]


def _bad_dtype() -> bytes:
    header = dict(HEADER)
    name = next(k for k in header if k != "__metadata__")
    header[name] = dict(header[name], dtype="Q9")
    return with_header(header, WEIGHTS[8 + HEADER_LEN:])


def _offset_beyond_data() -> bytes:
    header = dict(HEADER)
    name = next(k for k in header if k != "__metadata__")
    header[name] = dict(header[name], data_offsets=[0, 10 ** 12])
    return with_header(header, WEIGHTS[8 + HEADER_LEN:])


@pytest.mark.parametrize("corrupt", [_truncated, _header_beyond_file, _garbage_header, _data_too_short, _bad_dtype,
                                     _offset_beyond_data, lambda: b""],
                         ids=["truncated", "header-beyond-file", "garbage-header", "data-too-short", "bad-dtype",
                              "offset-beyond-data", "empty"])
def test_damaged_safetensors_is_named_with_what_to_do(tmp_path, corrupt):
    model = sample_copy(tmp_path)
    replace(model / "model.safetensors", corrupt())
    message = refusal(model, f"{model / 'model.safetensors'} is not a readable safetensors file",
                      "re-download or re-save the checkpoint")
    assert len(message) < 400  # the safetensors detail is cut, not its whole list of dtypes


def test_damaged_shard_of_a_sharded_checkpoint_is_named(tmp_path):
    model = sample_copy(tmp_path)
    (model / "model.safetensors").unlink()
    (model / "model-00001-of-00002.safetensors").symlink_to(SAMPLE / "model.safetensors")
    (model / "model-00002-of-00002.safetensors").write_bytes(_truncated())
    names = [k for k in HEADER if k != "__metadata__"]
    weight_map = {k: "model-00001-of-00002.safetensors" for k in names}
    weight_map[names[-1]] = "model-00002-of-00002.safetensors"
    index = model / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    refusal(model, "model-00002-of-00002.safetensors is not a readable safetensors file")
    weight_map[names[-1]] = "model-00003-of-00002.safetensors"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    refusal(model, "names the shard model-00003-of-00002.safetensors, which is not in", "download the missing shard")
    index.write_text("[1, 2")
    refusal(model, "model.safetensors.index.json is not valid JSON")


# ----- 2. weights that do not fit the config ---------------------------------------------------------------------

def test_more_experts_in_config_than_in_weights_is_refused_not_randomly_initialised(tmp_path, caplog):
    model = sample_copy(tmp_path, num_local_experts=16)
    refusal(model, "do not match its config", "[8, 160, 320] in the checkpoint but [16, 160, 320] for the config",
            "it sets num_local_experts = 16")
    assert "LOAD REPORT" not in caplog.text  # the refusal replaces transformers' table


def test_layers_the_checkpoint_lacks_are_refused_not_randomly_initialised(tmp_path):
    model = sample_copy(tmp_path, num_hidden_layers=6)
    refusal(model, "has no weights for model.layers.4.", "would fill with random values",
            f"correct {model / 'config.json'}")


def test_a_clean_load_still_reports_unexpected_keys_and_loads(tmp_path, caplog):
    from safetensors.torch import save_file

    model = sample_copy(tmp_path)
    state = load_file(SAMPLE / "model.safetensors")
    state["model.extra.weight"] = torch.zeros(2)
    (model / "model.safetensors").unlink()
    save_file(state, model / "model.safetensors", metadata={"format": "pt"})
    assert load_model(model).n_experts == 8
    assert "LOAD REPORT" in caplog.text  # not refused, so transformers' report is shown as usual


# ----- 3 and 4. top-k the router cannot use ----------------------------------------------------------------------

@pytest.mark.parametrize(("value", "shown"), [(9, "to 9, more than its 8 experts"), (0, "to 0;"),
                                              (None, "to null;"), ("2", 'to "2";'), (2.5, "to 2.5;")])
def test_unusable_top_k_is_refused_at_load_naming_the_field(tmp_path, value, shown):
    model = sample_copy(tmp_path, num_experts_per_tok=value)
    refusal(model, f"{model / 'config.json'} sets num_experts_per_tok {shown}",
            "an integer from 1 to 8 (num_local_experts)")


def test_unusable_expert_count_is_refused(tmp_path):
    model = sample_copy(tmp_path, num_local_experts=0)
    refusal(model, "sets num_local_experts to 0; set it to the number of experts")


@pytest.fixture(scope="module")
def deepseek_v2(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("ds") / "deepseek_v2", "deepseek_v2")


def _edited(source: Path, target: Path, **changes) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_null_top_k_of_the_default_deepseek_v2_config_is_refused(deepseek_v2, tmp_path):
    """DeepseekV2Config() leaves num_experts_per_tok at None and documents no default (released checkpoints set
    6), so MoEScope refuses instead of guessing."""
    from transformers import DeepseekV2Config

    assert DeepseekV2Config().num_experts_per_tok is None
    model = _edited(deepseek_v2, tmp_path / "m", num_experts_per_tok=None)
    refusal(model, "sets num_experts_per_tok to null", "an integer from 1 to 8 (n_routed_experts)")


def test_group_limited_routing_that_cannot_hold_top_k_is_refused(deepseek_v2, tmp_path):
    model = _edited(deepseek_v2, tmp_path / "uneven", topk_method="group_limited_greedy", n_group=3, topk_group=1)
    refusal(model, "sets n_group = 3 and topk_group = 1, which cannot route 2 of 8 experts per token")
    model = _edited(deepseek_v2, tmp_path / "small", topk_method="group_limited_greedy", n_group=4, topk_group=1,
                    num_experts_per_tok=3)
    refusal(model, "cannot route 3 of 8 experts per token")


def test_null_top_k_inside_a_nested_config_is_refused(tmp_path):
    model = save_tiny(tmp_path / "dbrx", "dbrx")
    config = json.loads((model / "config.json").read_text())
    config["ffn_config"]["moe_top_k"] = None
    (model / "config.json").write_text(json.dumps(config))
    refusal(model, "sets ffn_config.moe_top_k to null", "(ffn_config.moe_num_experts)")


# ----- 5. pickle .bin checkpoints ----------------------------------------------------------------------------------

class _Payload:
    """Unpickling this creates the marker file: the test checks that it never happens."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickle_bin_is_refused_without_unpickling_it(tmp_path):
    model = sample_copy(tmp_path)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, model / "pytorch_model.bin")
    refusal(model, "pytorch_model.bin weights", "hold pickled Python objects", "MoEScope never unpickles",
            "loads only safetensors or weights_only torch checkpoints")
    assert not marker.exists()


@pytest.mark.parametrize("data", [b"", b"hello world", None], ids=["empty", "junk", "truncated"])
def test_damaged_bin_is_named(tmp_path, data):
    model = sample_copy(tmp_path)
    (model / "model.safetensors").unlink()
    if data is None:
        torch.save(load_file(SAMPLE / "model.safetensors"), model / "pytorch_model.bin")
        data = (model / "pytorch_model.bin").read_bytes()[:5000]
    (model / "pytorch_model.bin").write_bytes(data)
    refusal(model, "pytorch_model.bin weights", "are not a readable torch checkpoint", "re-download or re-save")


def test_tensor_only_bin_still_loads(tmp_path):
    model = sample_copy(tmp_path)
    (model / "model.safetensors").unlink()
    torch.save(load_file(SAMPLE / "model.safetensors"), model / "pytorch_model.bin")
    assert load_model(model).n_experts == 8


# ----- 6. paths and config.json ----------------------------------------------------------------------------------

def test_missing_path_and_file_instead_of_directory(tmp_path):
    refusal(tmp_path / "nowhere", "No model directory at")
    (tmp_path / "file").write_text("x")
    refusal(tmp_path / "file", "No model directory at")


def test_directory_without_config_json(tmp_path):
    model = sample_copy(tmp_path)
    (model / "config.json").unlink()
    refusal(model, "No config.json in", "give the directory that holds the model's config.json")


@pytest.mark.parametrize(("content", "fragment"), [
    (b"{not json", "config.json is not valid JSON (Expecting property name"),
    (b'{"model_type": "\xff\xfe"}', "config.json is not UTF-8 text (byte 0xff at offset 16); re-save it as UTF-8"),
    (b"[1, 2]", "config.json holds a JSON list, not an object"),
    (b"{}", 'config.json has no model_type string; add the model\'s family, e.g. "model_type": "mixtral"'),
    (b"[" * 100_000 + b"]" * 100_000, "config.json is nested too deeply to read"),
], ids=["unparsable", "non-utf8", "list", "no-model-type", "deep"])
def test_unreadable_config_json(tmp_path, content, fragment):
    model = sample_copy(tmp_path)
    replace(model / "config.json", content)
    refusal(model, fragment)


def test_config_json_that_is_a_directory(tmp_path):
    model = sample_copy(tmp_path)
    (model / "config.json").unlink()
    (model / "config.json").mkdir()
    refusal(model, "No config.json in")


@pytest.mark.parametrize("model_type", ["llama", "no_such_family"])
def test_non_moe_or_unknown_model_type_names_the_path(tmp_path, model_type):
    model = sample_copy(tmp_path, model_type=model_type)
    refusal(model, f"Model type {model_type!r} is not a supported MoE family")


def test_moe_family_without_moe_layers_names_the_path(tmp_path):
    model = save_tiny(tmp_path / "dense", "qwen2_moe", mlp_only_layers=[0, 1])
    refusal(model, "has no MoE layer MoEScope can find")


def test_damaged_tokenizer_is_one_line(tmp_path):
    model = sample_copy(tmp_path)
    replace(model / "tokenizer.json", b'{"a": 1}')
    refusal(model, "Could not read the tokenizer files in", "remove them to work with token ids")


# ----- through the CLI -------------------------------------------------------------------------------------------

def test_info_prints_one_error_line(tmp_path, capsys):
    model = sample_copy(tmp_path, num_experts_per_tok=9)
    assert main(["info", str(model)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sets num_experts_per_tok to 9" in err and "Traceback" not in err
