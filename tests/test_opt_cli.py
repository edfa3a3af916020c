"""``collapse-jax lm score`` / ``generate`` against transformers on a tiny random checkpoint."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from collapse_jax.core.paths import data_file
from collapse_jax.families.lm import cli as lm_cli

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "",
    "Model collapse is a degenerative process affecting generations of learned generative "
    "models, in which the data they generate end up polluting the training set of the next.",
    "Hello",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny OPT with the real OPT tokenizer's vocabulary, saved with the tokenizer files."""
    tok_dir = data_file("tokenizers/opt-125m")
    if tok_dir is None:
        pytest.skip("tokenizers/opt-125m not in the data directory")
    path = tmp_path_factory.mktemp("opt-cli")
    torch.manual_seed(0)
    config = transformers.OPTConfig(
        vocab_size=50272,
        hidden_size=16,
        num_hidden_layers=1,
        ffn_dim=32,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    model = transformers.OPTForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(str(path))
    for f in tok_dir.iterdir():
        shutil.copy(f, path / f.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    return path, model, tokenizer


def torch_nll(model, ids):
    """Summed next-token NLL of one unpadded sequence (float64 log-softmax)."""
    if len(ids) < 2:
        return 0.0
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return -float(sum(logp[t, ids[t + 1]] for t in range(len(ids) - 1)))


def test_score_matches_direct_computation(checkpoint, tmp_path, capsys):
    path, model, tokenizer = checkpoint
    text = tmp_path / "text.txt"
    text.write_text("\n".join(LINES) + "\n")
    out = tmp_path / "scores.jsonl"
    block = 16
    argv = ["score", "--model", str(path), "--text-file", str(text)]
    argv += ["--block-size", str(block), "--batch-size", "2", "--out", str(out)]
    assert lm_cli.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == list(range(len(LINES)))
    for line, row in zip(LINES, rows, strict=True):
        ids = tokenizer(line)["input_ids"]
        # Windows of `block` tokens starting every block - 1 tokens (overlap of one).
        starts = range(0, max(len(ids) - 1, 1), block - 1)
        want = sum(torch_nll(model, ids[s : s + block]) for s in starts)
        assert row["n_tokens"] == len(ids) - 1
        if row["n_tokens"] == 0:
            assert row["nll"] is None and row["perplexity"] is None
            continue
        np.testing.assert_allclose(row["nll_sum"], want, rtol=1e-5)
        np.testing.assert_allclose(row["nll"], want / row["n_tokens"], rtol=1e-5)
        np.testing.assert_allclose(row["perplexity"], np.exp(want / row["n_tokens"]), rtol=1e-5)
    assert len(tokenizer(LINES[2])["input_ids"]) > block  # the long line was windowed


def test_generate_matches_transformers_beam_search(checkpoint, tmp_path, capsys):
    path, model, tokenizer = checkpoint
    prompts = ["The quick brown fox", "Hello there, my name is", "A"]
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(prompts) + "\n")
    argv = ["generate", "--model", str(path), "--prompt-file", str(pf), "--num-beams", "3"]
    argv += ["--max-new-tokens", "5", "--min-new-tokens", "5", "--repetition-penalty", "1.3"]
    argv += ["--batch-size", "2"]
    assert lm_cli.main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt_index"] for r in rows] == [0, 1, 2]
    for prompt, row in zip(prompts, rows, strict=True):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            ref = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                num_beams=3,
                max_new_tokens=5,
                min_new_tokens=5,
                repetition_penalty=1.3,
                do_sample=False,
                pad_token_id=1,
            )
        want = ref[0, ids.shape[1] :].tolist()
        assert row["new_token_ids"] == want
        assert row["text"] == tokenizer.decode(want, skip_special_tokens=True)


def test_errors_are_one_line_config_errors(checkpoint, tmp_path, capsys):
    path, _, _ = checkpoint
    text = tmp_path / "t.txt"
    text.write_text("hi\n")
    missing = tmp_path / "nowhere" / "a" / "b"
    assert lm_cli.main(["score", "--model", str(missing), "--text-file", str(text)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err
    assert lm_cli.main(["score", "--model", str(path), "--text-file", str(tmp_path / "x")]) == 2
    assert "text file" in capsys.readouterr().err
    argv = ["score", "--model", str(path), "--text-file", str(text), "--block-size", "999"]
    assert lm_cli.main(argv) == 2
    assert "block-size" in capsys.readouterr().err
    argv = ["score", "--model", str(path), "--text-file", str(text), "--dtype", "float8"]
    assert lm_cli.main(argv) == 2
    assert "float8" in capsys.readouterr().err
