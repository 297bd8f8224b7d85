"""kvfx under tensor parallelism (``torch.distributed``): process group set-up, loading a model
with Hugging Face's ``tp_plan="auto"``, and byte counts summed over ranks.

Under tensor parallelism each rank runs the same graph on its own slice of the attention heads
(Hugging Face shards q/k/v_proj column-wise and o_proj row-wise), so kvfx rewrites each rank's
attention sites for that rank's heads and every compressed store is naturally sharded: a rank
holds the stores of its own KV heads. Nothing in kvfx communicates between ranks except
:func:`all_ranks_memory` (an ``all_reduce`` of byte counts, on request).

Example (``torchrun --nproc_per_node 2 script.py``)::

    from kvfx.distributed import init_from_env, load_model_tp
    init_from_env()                          # gloo on CPU, nccl on CUDA
    model, tok = load_model_tp("smollm2-135m")
    kvfx.compile(model, "snapkv@0.25")
    out = model.generate(ids, max_new_tokens=8, return_dict_in_generate=True)
    kvfx.memory(out.past_key_values, all_ranks=True)["all_ranks"]["store_bytes"]
"""

from __future__ import annotations

import contextlib
import os

import torch

from kvfx.runtime.ranks import (SITE_SUMMED, SUMMED, TPError, all_ranks_memory, is_distributed,  # noqa: F401
                               rank, world_size)

__all__ = ["TPError", "init_from_env", "is_distributed", "rank", "world_size", "is_writer", "tp_size",
           "load_model_tp", "all_ranks_memory", "broadcast_object", "barrier", "check_tp_policy",
           "check_tp_policies", "cli_session"]


def is_writer() -> bool:
    """Rank 0 (or no process group): the process that writes results and prints."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj):
    """``obj`` of rank 0 on every rank (unchanged without a process group)."""
    if not is_distributed():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def init_from_env(tp: int | None = None, backend: str | None = None) -> int:
    """Initialize the default process group from ``torchrun``'s environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) when it is not already; returns the world size.

    ``tp``: the tensor-parallel size asked for; it must equal the number of processes (kvfx runs
    pure tensor parallelism: every rank holds one shard of every layer). ``backend``: default
    ``nccl`` when CUDA is available, else ``gloo``. Without ``torchrun``'s environment and ``tp``
    None or 1, nothing is initialized and 1 is returned.
    """
    import torch.distributed as dist

    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if not is_distributed():
        if env_world > 1 or (tp is not None and tp > 1):
            if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
                raise TPError(
                    f"--tp {tp}: no process group and no torchrun environment (RANK, WORLD_SIZE, "
                    f"MASTER_ADDR); fix: launch with `torchrun --nproc_per_node {tp or env_world} "
                    f"$(which kvfx) ...`")
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend)
    world = world_size()
    if tp is not None and tp != world:
        raise TPError(f"--tp {tp} but {world} process(es) run; fix: launch with "
                      f"`torchrun --nproc_per_node {tp}` (kvfx runs pure tensor parallelism, "
                      f"one shard of every layer per process)")
    return world


def check_heads(config, world: int) -> None:
    """Refuse a model whose attention heads do not split evenly over ``world`` ranks (Hugging
    Face would shard the projections unevenly, and each rank's head count would be wrong)."""
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    if heads is None:
        return
    if heads % world or kv % world:
        raise TPError(f"tensor parallelism over {world} ranks needs the query heads ({heads}) and the KV "
                      f"heads ({kv}) to be multiples of {world}; fix: --tp a divisor of {kv}")


def load_model_tp(name_or_path: str, *, dtype: torch.dtype = torch.float32,
                  attn_implementation: str = "sdpa", progress: bool = False):
    """:func:`kvfx.models.load_model` with ``tp_plan="auto"``: each rank loads its own shard of
    the weights (the process group must be initialized, see :func:`init_from_env`). A registry
    model is converted once, by rank 0, while the other ranks wait."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvfx import models

    if not is_distributed():
        raise TPError("load_model_tp needs an initialized process group; fix: launch under torchrun "
                      "and call kvfx.distributed.init_from_env() first")
    spec = models.MODEL_REGISTRY.get(name_or_path)
    path = name_or_path
    if spec is not None:
        if is_writer():
            models._ensure_cached(spec, progress=progress)
        barrier()
        path = str(models.model_cache_path(spec.name))
    elif models._is_gguf(path):
        raise TPError(f"{path}: a GGUF file cannot be loaded with tp_plan; fix: convert it once with "
                      f"load_model(...) and save_pretrained, or use a registry name")
    check_heads(AutoConfig.from_pretrained(path), world_size())
    with models._progress_bars(progress):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                     tp_plan="auto")
    tok = models.load_tokenizer(path)
    models._prepare_for_eval(model, tok)
    return model, tok


def tp_size(model) -> int:
    """How many ranks ``model``'s weights are sharded over (Hugging Face ``tp_plan``): 1 when not."""
    n = getattr(model, "tp_size", None) or getattr(model, "_tp_size", None)
    if n:
        return int(n)
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return 1
    for p in model.parameters():
        if isinstance(p, DTensor):
            return int(p.device_mesh.size())
    return 1


def check_tp_policy(model, policy) -> None:
    """Refuse, before anything is compiled, a policy whose state spans KV heads on a model sharded
    over several ranks (each rank sees only its own KV heads, so such state would silently differ
    from the single-process run). What is refused, and why:

    * ``budget.allocation: adaptive`` (AdaKV): a layer's budget goes to the top scores over all its
      KV heads jointly; a rank would share it among its own heads only.
    * ``lowrank:`` (ReCalKV): the calibrated factors of a head group project the hidden state to
      one latent shared by the group's KV heads, and the artifact holds every KV head of the
      layer; splitting factors per rank is not implemented.

    ChunkKV (``eviction.chunk``), whose chunk score is summed over all KV heads of the layer, runs
    sharded: :func:`kvfx.compile` passes the ranks to the backend, and the per-token sums are
    all-reduced over them (:func:`kvfx.runtime.ranks.all_reduce_sum`), so every rank keeps the
    chunks one process keeps.

    Everything else (per-head scores, per-layer budgets, CaliDrop's per-query-head stored queries,
    H2O/TOVA probabilities, LagKV partitions, KIVI groups) is per KV head or per layer and runs
    sharded; tests/runtime/test_tensor_parallel.py checks each preset against the single process.
    """
    world = tp_size(model)
    if world <= 1:
        return
    from kvfx.models import attention_sites
    from kvfx.policy import load_policy

    pol = load_policy(policy)
    paths = attention_sites(model)
    for i, path in enumerate(paths):
        why = tp_refusal(pol.resolve(i, path, len(paths)), world)
        if why:
            raise TPError(f"policy {pol.name!r} at {path}: {why}")


def tp_refusal(lp, world: int) -> str | None:
    """Why a resolved layer policy cannot run sharded over ``world`` tensor-parallel ranks (its
    state spans KV heads a rank does not hold), with the fix; None when it can. Used by
    :func:`check_tp_policy` and by the backend's passes (a plain ``model.compile(backend="kvfx")``
    of a sharded model)."""
    if getattr(lp.budget, "allocation", "uniform") == "adaptive" and lp.eviction.scorer != "none":
        return (f"AdaKV (budget.allocation: adaptive) shares a layer's budget among all its KV heads by their "
                f"scores, but under tensor parallelism ({world} ranks) each rank holds only its own KV heads, "
                f"so the ranks would keep other tokens than one process; fix: budget.allocation: uniform "
                f"(e.g. snapkv instead of adakv-snapkv) or run without tp_plan")
    if getattr(lp, "lowrank", None) is not None:
        return (f"lowrank (ReCalKV) factors project to latents shared by the KV heads of a head group and "
                f"cover every KV head of the layer; splitting them over {world} tensor-parallel ranks is not "
                f"implemented; fix: run lowrank policies without tp_plan, or use a per-head policy (snapkv, "
                f"kivi4, ...) under tensor parallelism")
    return None


def check_tp_policies(model, specs) -> None:
    """:func:`check_tp_policy` for every policy spec of a command line (``NAME@KEEP`` included)."""
    from kvfx.eval.harness import policy_from_spec

    for spec in specs or ():
        check_tp_policy(model, policy_from_spec(spec))


@contextlib.contextmanager
def cli_session(args):
    """The CLI under ``torchrun``: when ``--tp N`` is given or ``WORLD_SIZE`` > 1, initialize the
    process group (:func:`init_from_env`), make ``kvfx.models.load_model`` load each rank's shard
    (``tp_plan="auto"``) and refuse policies that cannot be sharded (:func:`check_tp_policy`) as
    soon as the model is loaded, and let only rank 0 write: the other ranks run the same work
    (they must: every layer all-reduces) with ``--out`` in a private copy of rank 0's directory
    (so that resumed runs skip the same samples) and their stdout discarded. Without TP, nothing
    changes."""
    tp = getattr(args, "tp", None)
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if (tp is None or tp == 1) and env_world <= 1 and not is_distributed():
        yield
        return
    command = getattr(args, "bench_command", None) or getattr(args, "command", None)
    if not hasattr(args, "tp"):
        raise TPError(f"kvfx {command or ''}: runs on one process; tensor parallelism (torchrun, WORLD_SIZE="
                      f"{env_world}) is supported by `kvfx eval` and `kvfx bench e2e`; fix: run it without torchrun")
    if str(getattr(args, "model", "")).startswith("synthetic:"):
        raise TPError(f"--model {args.model}: a synthetic model is built in each process, not loaded with "
                      f"tp_plan, so it would not be sharded; fix: save it with save_pretrained and pass the "
                      f"directory, or use a registry model")
    started = not is_distributed()
    world = init_from_env(tp)
    from kvfx import models

    real = models.load_model
    specs = getattr(args, "policy", None)

    def load_model(name_or_path, *, dtype=torch.float32, attn_implementation="sdpa", progress=True):
        model, tok = load_model_tp(name_or_path, dtype=dtype, attn_implementation=attn_implementation,
                                   progress=progress and is_writer())
        check_tp_policies(model, specs)
        return model, tok

    out = getattr(args, "out", None)
    private = None
    if out is not None and not is_writer():
        import shutil
        import tempfile

        private = tempfile.mkdtemp(prefix=f"kvfx-rank{rank()}-")
        if os.path.isdir(out):
            shutil.copytree(out, private, dirs_exist_ok=True)
        args.out = private
    barrier()  # every rank has read rank 0's directory before rank 0 writes to it
    models.load_model = load_model
    devnull = open(os.devnull, "w") if not is_writer() else None
    if devnull:
        os.environ["TQDM_DISABLE"] = "1"  # one set of progress bars: rank 0's
    try:
        with contextlib.redirect_stdout(devnull) if devnull else contextlib.nullcontext():
            yield world
        barrier()  # only on success: a rank that failed alone would leave the others waiting here
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    finally:
        models.load_model = real
        if devnull:
            devnull.close()
        if private:
            import shutil

            shutil.rmtree(private, ignore_errors=True)
