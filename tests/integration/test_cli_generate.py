"""`dvi generate`: streams the model's own greedy text; bad input is one line and exit code 2."""

import json

import pytest
import torch

from dvi.cli import main
from tests.tiny_models import STORIES


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_streams_the_models_greedy_text(capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code, out, err = run(capsys, "generate", "--model", str(STORIES), "--exit-layer", "3",
                         "--prompt", "Once upon a time", "--max-new-tokens", "24", "--gamma", "4")
    assert code == 0
    tok = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    ref = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
    assert out.strip() == tok.decode(ref, skip_special_tokens=True).strip()
    assert "tau" in err


def _one_line_error(code, out, err, needle):
    assert code == 2, (code, out, err)
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model", "no-such-model"], "unknown model"),
        (["--model", "/nonexistent/model/dir"], "not found"),
        (["--model", str(STORIES), "--exit-layer", "5"], "out of range"),
        (["--model", str(STORIES), "--exit-layer", "0"], "exit_layer"),
        (["--model", str(STORIES), "--exit-layer", "2", "--max-new-tokens", "100000"], "context"),
        (["--model", str(STORIES), "--exit-layer", "2", "--gamma", "-1"], "gamma"),
    ],
)
def test_bad_input_is_one_line(capsys, args, needle):
    _one_line_error(*run(capsys, "generate", "--prompt", "hello", *args), needle)


def test_empty_prompt_is_one_line(capsys):
    _one_line_error(*run(capsys, "generate", "--model", str(STORIES), "--exit-layer", "2", "--prompt", "  "), "empty")


def test_non_causal_models_are_refused(capsys, tmp_path):
    from transformers import T5Config, ViTConfig

    T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=50).save_pretrained(tmp_path / "t5")
    _one_line_error(*run(capsys, "generate", "--model", str(tmp_path / "t5"), "--prompt", "hi"), "encoder-decoder")
    ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path / "vit")
    _one_line_error(*run(capsys, "generate", "--model", str(tmp_path / "vit"), "--prompt", "hi"), "causal")


def test_directory_without_config_is_refused(capsys, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"0")
    _one_line_error(*run(capsys, "generate", "--model", str(tmp_path), "--prompt", "hi"), "config.json")


def test_corrupt_adapter_is_refused(capsys, tmp_path):
    from common.core.config import DrafterConfig, ModelSpec
    from common.model.split import SplitModel

    split = SplitModel.load(ModelSpec(model=str(STORIES), drafter=DrafterConfig(exit_layer=2)))
    split.save_adapter(tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    _one_line_error(*run(capsys, "generate", "--model", str(STORIES), "--exit-layer", "2", "--prompt", "hi",
                         "--adapter", str(tmp_path / "adapter")), "corrupt")
    split.save_adapter(tmp_path / "other")  # an adapter for exit layer 2 refused at exit layer 3
    _one_line_error(*run(capsys, "generate", "--model", str(STORIES), "--exit-layer", "3", "--prompt", "hi",
                         "--adapter", str(tmp_path / "other")), "exit layer")
    meta = json.loads((tmp_path / "other" / "dvi_adapter.json").read_text())
    assert meta["exit_layer"] == 2 and torch.is_tensor(next(iter(split.adapter_state().values())))
