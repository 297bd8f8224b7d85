"""One rank of tests/runtime/test_tensor_parallel.py (launched with RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT set; not collected by pytest).

    python tp_worker.py MODEL_DIR OUT.json PROMPT_LEN NEW_TOKENS PRESET[,PRESET...] [LOWRANK_ARTIFACT]

(``!name``: a preset expected to be refused under TP; ``plain:name``: compiled with
``model.compile(backend="kvfx")`` instead of ``kvfx.compile``; a LOWRANK_ARTIFACT adds a ReCalKV
policy, also expected to be refused.)

Every rank runs every preset on the model loaded with ``tp_plan="auto"``, and the single-process
reference of a share of the presets (preset i on rank i % world) on the same weights loaded
without TP, so the references cost no extra wall time. Rank 0 writes one JSON record per preset:
the reference's tokens and store bytes, and each rank's tokens, memory and explain() heads.
"""

import json
import os
import sys
import time
import traceback

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.distributed as dist


def run(model, policy, ids, new_tokens, all_ranks):
    import kvfx

    if policy.startswith("plain:"):  # model.compile(backend="kvfx") itself, not kvfx.compile
        model.compile(backend="kvfx", options={"policy": policy[len("plain:"):], "inner": "eager"})
    else:
        kvfx.compile(model, policy, inner="eager")
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                         pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    mem = kvfx.memory(out.past_key_values, all_ranks=all_ranks)
    heads = {s.module_path: [s.q_heads, s.kv_heads, s.rewritten] for s in kvfx.sites(model)}
    return {"tokens": out.sequences[0, ids.shape[1]:].tolist(),
            "first_logits": out.scores[0][0].double().tolist(),
            "store_bytes": mem["store_bytes"], "held_bytes": mem["held_bytes"],
            "sites": {k: {"held_bytes": v["held_bytes"], "kv_bytes": v["kv_bytes"], "calib_bytes": v["calib_bytes"], "tokens_held": v["tokens_held"],
                          "tokens_seen": v["tokens_seen"]} for k, v in mem["sites"].items()},
            "all_ranks": mem.get("all_ranks"), "rank": mem["rank"], "world_size": mem["world_size"],
            "explain": kvfx.explain(model), "heads": heads}


def main():
    model_dir, out_path, prompt_len, new_tokens, presets = sys.argv[1:6]
    artifact = sys.argv[6] if len(sys.argv) > 6 else None
    prompt_len, new_tokens, presets = int(prompt_len), int(new_tokens), presets.split(",")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from transformers import AutoModelForCausalLM

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, 96, (1, prompt_len), generator=g)
    # "!name": expected to be refused under TP (no single-process reference is run for it)
    policies = [(p.lstrip("!"), p.lstrip("!"), p.startswith("!")) for p in presets]
    if artifact:  # ReCalKV: a low-rank policy on calibrated factors, written as a policy file
        lowrank = os.path.join(os.path.dirname(out_path), "lowrank.yaml")
        if rank == 0:
            with open(lowrank, "w") as f:
                f.write(f"kvfx: 1\nname: lowrank-test\nlowrank: {{artifact: {artifact}}}\n")
        dist.barrier()
        policies.append(("lowrank", lowrank, True))
    records = {}
    for i, (name, policy, refused) in enumerate(policies):
        rec = {}
        t = time.perf_counter()
        try:
            m = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto").eval()
            rec["tp"] = run(m, policy, ids, new_tokens, all_ranks=True)
        except Exception as e:  # reported, not hidden: the test fails or checks the refusal
            rec["tp_error"] = f"{type(e).__name__}: {e}"
            rec["tp_traceback"] = traceback.format_exc()[-3000:]
        rec["tp_s"] = time.perf_counter() - t
        if i % world == rank and not refused:
            t = time.perf_counter()
            try:
                m = AutoModelForCausalLM.from_pretrained(model_dir).eval()
                rec["ref"] = run(m, policy, ids, new_tokens, all_ranks=False)
            except Exception as e:
                rec["ref_error"] = f"{type(e).__name__}: {e}"
            rec["ref_s"] = time.perf_counter() - t
        records[name] = rec
        # a rank that failed inside a collective would leave the others waiting: stop together
        dist.barrier()
    gathered = [None] * world
    dist.all_gather_object(gathered, records)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
