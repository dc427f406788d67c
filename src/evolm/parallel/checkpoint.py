"""Sharded checkpoints: every rank writes the part of the model and optimizer it holds, with
``torch.distributed.checkpoint`` (DCP), and a checkpoint written under one layout resumes under another.

Why: the full-state path (``train.ckpt_format: full``, ``evolm/checkpoint.py``) gathers every
parameter and both AdamW moments onto rank 0 and writes them from there: rank 0 needs the
whole state in memory and is the only writer. DCP (the format torchtitan uses; API in
``torch.distributed.checkpoint``) has each rank write its own shards, in parallel, plus one
metadata file saying which bytes of which tensor are where. Entries are keyed by the *plain*
model's names (``torch.distributed.checkpoint.state_dict.get_state_dict`` strips DDP, FSDP and
compile wrappers and names the optimizer's moments by their parameter), so on load each rank
asks for the slices it now holds and DCP reads the byte ranges that cover them: fsdp 2 -> one
process, one process -> fsdp 2, ddp, tensor parallel are all the same load.

A step folder (``out/checkpoints/step_NNNNNNN``) in this format::

    dcp/.metadata        DCP's index: tensor name -> shards -> file, offset, length
    dcp/__R_0.distcp     the tensors rank R wrote: "model.<name>" and "optim.state.<name>.exp_avg" ...
    trainer.pt           progress (phase, step, tokens), the optimizer's non-tensor values (param
                         groups), the layout that wrote it (world size, data-parallel degree), "format": "dcp"
    rank_RRRRR.pt        one per rank: its data-parallel rank and degree, the task's data position, RNG states
    config.json          the model config (and the tokenizer files), so the folder names its model

No ``model.safetensors`` is written at each step (that is the gather DCP avoids): ``evolm
checkpoint consolidate STEP`` writes it from the shards, on one process, and ``evolm.checkpoint.
load_checkpoint`` (hence ``evolm generate --model STEP``) reads the shards directly when it is
missing. The run's final model is still gathered and written whole, as before.

The save is atomic, as the full path's is: every rank writes into ``.tmp-step_NNNNNNN`` beside
the step folder, rank 0 checks that every rank's file arrived, fsyncs, and renames it into place;
a kill before the rename leaves the previous checkpoint as the latest (the stale temporary
folder is removed by the next save). All ranks write into one folder: on several nodes the run
folder must be on a filesystem they share (a missing rank file is reported as such).

Nothing in a checkpoint runs code on load: DCP's index is a pickle, read here by an unpickler
that admits only DCP's metadata classes, torch.Size and dtypes; evolm writes no pickled objects
into the shards (a shard entry that is not a tensor is refused), and the ``.pt`` files are read
with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from evolm.checkpoint import TRAINER, CheckpointError, fsync_file, load_trainer_state, publish_dir

SHARDS = "dcp"
FORMAT = "dcp"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def is_sharded(folder: str | os.PathLike) -> bool:
    """True for a step folder written by :func:`save` (it has DCP's index)."""
    return os.path.isfile(os.path.join(folder, SHARDS, ".metadata"))


# --------------------------------------------------------------------------------------------
# the state, as DCP sees it
# --------------------------------------------------------------------------------------------
def _options(partial: bool, strict: bool = True) -> StateDictOptions:
    # flattened optimizer state: "state.<param name>.exp_avg", "param_groups.<param name>.lr" -
    # one key per value, so a shard of one parameter's moment is addressed like the parameter
    return StateDictOptions(flatten_optimizer_state_dict=True, ignore_frozen_params=partial, strict=strict)


def split_state(net, optimizer, partial: bool = False) -> tuple[dict[str, dict], dict[str, Any]]:
    """``({"model": ..., "optim": ...}, plain)``: the tensors (DTensors under FSDP/TP, the
    parameters' own storage) for DCP, and the optimizer's non-tensor values (learning rate,
    betas ... per parameter) kept in ``trainer.pt``. An optimizer that has not stepped yet gets
    its state created by a step with zero gradients and zero LR (torch's ``_init_optim_state``),
    which leaves the parameters unchanged; the load then overwrites it."""
    from evolm.parallel.expert import shard_optimizer_state

    msd, osd = get_state_dict(net, optimizer, options=_options(partial))
    optim = shard_optimizer_state(net, {k: v for k, v in osd.items() if isinstance(v, torch.Tensor)})  # ep
    tensors = {"model": msd, "optim": optim}
    return tensors, {k: v for k, v in osd.items() if not isinstance(v, torch.Tensor)}


def stateful(net):
    """The module whose parameter names are the plain model's: ``net`` itself (DDP, FSDP and
    tensor parallel keep them), or for a pipeline (``parallel/pipeline.py``, whose ``module`` is a
    list of this rank's stages, each keyed like the whole model) one module holding the stages'
    parts under the whole model's names, so a stage's shards land where one process expects them."""
    stages = getattr(net, "modules", None)
    if not isinstance(stages, list):
        return net
    whole, layers = torch.nn.Module(), torch.nn.ModuleDict()
    for stage in stages:
        for name, child in stage.named_children():
            if name == "layers":
                layers.update(child)
            else:
                setattr(whole, name, child)  # a tied embedding on two stages of one rank: one object
    whole.layers = layers
    return whole


# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------
def save(net, optimizer, path: str | os.PathLike, *, progress: dict[str, Any], rank_state: dict[str, Any],
         rank: int, world: int, partial: bool = False, files: dict[str, str] | None = None,
         before_publish: Callable[[Path], None] | None = None) -> None:
    """Write a step folder (layout in the module docstring) atomically. A collective: every rank
    calls it, with its own ``rank_state`` (data position, RNG); ``progress`` and ``files`` (text
    files such as config.json) are written by rank 0. ``before_publish`` is a test hook run on
    rank 0 just before the rename."""
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed earlier
        tmp.mkdir(parents=True)
    _barrier(world)
    try:
        tensors, plain = split_state(net, optimizer, partial)
        plain = _union_dicts(plain, world)  # pipeline stages hold different parameters
        with _one_process_is_intended():
            dcp.save(tensors, storage_writer=FileSystemWriter(tmp / SHARDS, sync_files=True), no_dist=world == 1)
        _write_pt(rank_state, tmp / rank_file(rank))
        _barrier(world)
        if rank == 0:
            _check_ranks_arrived(tmp, world)
            _write_pt({**progress, "format": FORMAT, "optimizer_plain": plain, "world": world}, tmp / TRAINER)
            for name, text in (files or {}).items():
                (tmp / name).write_text(text)
            if before_publish is not None:
                before_publish(tmp)
            publish_dir(str(tmp), str(path))
    except BaseException:
        if rank == 0:  # the previous checkpoint is untouched; do not leave half a folder behind
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier(world)


def _write_pt(obj: dict, path: Path) -> None:
    torch.save(obj, path)
    fsync_file(str(path))


def _check_ranks_arrived(tmp: Path, world: int) -> None:
    missing = [r for r in range(world) if not (tmp / rank_file(r)).is_file()]
    if missing:
        raise CheckpointError(
            f"{tmp}: the files of rank(s) {missing} are not in the checkpoint folder although every rank "
            f"wrote them: all ranks must write into one folder, so on several nodes the run folder must be "
            f"on a filesystem every node mounts at the same path (NFS, Lustre ...)")


@contextlib.contextmanager
def _one_process_is_intended():
    """DCP warns on every save/load without a process group; one process is a layout here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier(world: int) -> None:
    if world > 1 and dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------
def load(net, optimizer, folder: str | os.PathLike, *, partial: bool = False) -> None:
    """Load a step folder's model and optimizer state into ``net`` / ``optimizer`` as they are
    laid out now (any layout; a collective when a process group is up)."""
    from evolm.parallel.expert import local_optimizer_state

    folder = Path(folder)
    plain = load_trainer_state(str(folder)).get("optimizer_plain")
    if plain is None:
        raise CheckpointError(f"{folder / TRAINER}: no optimizer_plain; not a sharded (dcp) checkpoint")
    tensors, now = split_state(net, optimizer, partial)
    _check_same_names(folder, plain, tensors, now)
    _load_tensors(tensors, folder / SHARDS, no_dist=not dist.is_initialized())
    local_optimizer_state(net, tensors["optim"])  # ep: the experts' moments back to this rank's rows
    mine = {k: v for k, v in plain.items() if k in now}  # this rank's parameters (a pipeline stage: some)
    set_state_dict(net, optimizer, model_state_dict=tensors["model"], optim_state_dict={**tensors["optim"], **mine},
                   options=_options(partial, strict=not partial))


def _check_same_names(folder: Path, plain: dict, tensors: dict, now_plain: dict) -> None:
    """The names saved and the names all ranks hold now must be the same set: a model with a
    layer more or less, or another trainable part, is refused by name before anything loads."""
    meta = SafeReader(folder / SHARDS).read_metadata()
    saved = {k for k in meta.state_dict_metadata if k.startswith(("model.", "optim."))} | set(plain)
    here = {f"model.{k}" for k in tensors["model"]} | {f"optim.{k}" for k in tensors["optim"]} | set(now_plain)
    here = _union_sets(here)
    if saved != here:
        extra, lost = sorted(saved - here), sorted(here - saved)
        raise CheckpointError(f"{folder}: does not fit this run's model and optimizer (saved but not here: "
                              f"{_few(extra)}; here but not saved: {_few(lost)})")


def _union_sets(names: set[str]) -> set[str]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return names
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, sorted(names))
    return set().union(*every)


def _union_dicts(d: dict, world: int) -> dict:
    if world == 1 or not dist.is_initialized():
        return d
    every: list = [None] * world
    dist.all_gather_object(every, d)
    return {k: v for e in every for k, v in e.items()}


def _few(names: list[str], n: int = 3) -> str:
    return (", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")) or "none"


def read_rank_states(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Every rank's ``rank_RRRRR.pt`` (data-parallel rank and degree, task state, RNG), in rank order."""
    folder = Path(folder)
    world = load_trainer_state(str(folder)).get("world")
    out = []
    for r in range(int(world or 0)):
        p = folder / rank_file(r)
        if not p.is_file():
            raise CheckpointError(f"{p}: missing; the checkpoint of a {world}-rank run holds one file per rank")
        try:
            out.append(torch.load(p, map_location="cpu", weights_only=True))
        except Exception as e:  # truncated, not a torch file, or holding objects beyond plain data
            raise CheckpointError(f"{p}: damaged or holds more than plain data ({_first_line(e)})") from None
    return out


def read_model_state(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The whole model's tensors from the shards, on this process alone (no process group, no
    model needed): what ``evolm checkpoint consolidate`` and ``load_checkpoint`` use."""
    reader = SafeReader(Path(folder) / SHARDS)
    meta = reader.read_metadata()
    state = {k[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in meta.state_dict_metadata.items()
             if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    _load_tensors({"model": state}, Path(folder) / SHARDS, no_dist=True, reader=reader)
    return state


def _load_tensors(tensors: dict, shards: Path, no_dist: bool, reader: FileSystemReader | None = None) -> None:
    """``dcp.load`` in place, its failures (which DCP gathers from every rank into one
    ``CheckpointException``) as one CheckpointError naming the folder."""
    reader = reader or SafeReader(shards)
    reader.read_metadata()  # a damaged or hostile index stops here, before DCP's collectives
    try:
        with _one_process_is_intended():
            dcp.load(tensors, storage_reader=reader, planner=TensorsOnlyPlanner(), no_dist=no_dist)
    except CheckpointException as e:
        first = next(iter(e.failures.values()))[0] if e.failures else e
        if isinstance(first, CheckpointError):
            raise CheckpointError(str(first)) from None
        raise CheckpointError(f"{shards}: cannot be read into this model ({_first_line(first)})") from None


def consolidate(folder: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write ``model.safetensors`` (+ config.json and the tokenizer files) from a sharded step
    folder into ``out`` (default: the step folder itself), so ``evolm generate`` and the Hugging
    Face exporters read it like any evolm checkpoint. Returns the folder written."""
    from safetensors.torch import save_file

    from evolm.checkpoint import WEIGHTS, load_config

    folder = Path(folder)
    if not is_sharded(folder):
        raise CheckpointError(f"{folder}: no {SHARDS}/.metadata; not a sharded (dcp) checkpoint folder")
    config = load_config(str(folder))
    state = {k: v.contiguous() for k, v in read_model_state(folder).items()}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    dest = Path(out) if out is not None else folder
    dest.mkdir(parents=True, exist_ok=True)
    if dest != folder:
        for f in folder.iterdir():
            if f.is_file() and f.suffix in (".json", ".txt", ".model") and not f.name.startswith("rank_"):
                shutil.copy2(f, dest / f.name)
    part = dest / (WEIGHTS + ".part")
    save_file(state, str(part), metadata={"format": "pt"})
    fsync_file(str(part))
    os.replace(part, dest / WEIGHTS)  # a reader never sees half a file
    return dest


# --------------------------------------------------------------------------------------------
# the data position under a changed data-parallel degree
# --------------------------------------------------------------------------------------------
def data_state(states: list[dict[str, Any]], dp_rank: int, dp_degree: int, task, where: str) -> dict:
    """This rank's task state from the saved ranks' ``states``. Under the same data-parallel
    degree: the state of the saved rank with the same data-parallel rank (bit-exact resume).
    Under another degree the task re-derives it (``task.reshard_data_state(states_by_dp_rank,
    saved_degree, dp_rank, dp_degree)``) or, when it cannot, the resume stops here."""
    saved = int(states[0]["dp_degree"])
    by_dp: dict[int, dict] = {}
    for s in states:
        by_dp.setdefault(int(s["dp_rank"]), s["task"])
    if saved == dp_degree:
        return by_dp[dp_rank]
    reshard = getattr(task, "reshard_data_state", None)
    if reshard is None:
        raise CheckpointError(
            f"{where}: saved with data-parallel degree {saved}, resuming with {dp_degree}: the data position "
            f"of {type(task).__name__} is kept per data-parallel rank and cannot be re-derived for another "
            f"degree; resume with data-parallel degree {saved}, or start a new run from these weights")
    return reshard([by_dp[r] for r in range(saved)], saved, dp_rank, dp_degree)


# --------------------------------------------------------------------------------------------
# reading without running code
# --------------------------------------------------------------------------------------------
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"),
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
            ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
            ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata classes, torch.Size and dtypes: what ``.metadata`` holds, nothing
    that could run code (a plain ``pickle.load``, as DCP's own reader does, runs anything)."""

    def find_class(self, module: str, name: str):
        if module == _METADATA_MODULE or (module, name) in _ALLOWED or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name} is not part of a DCP index")


class _Refused(pickle.UnpicklingError):
    pass


class SafeReader(FileSystemReader):
    """DCP's file reader with the index read by :class:`_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = os.path.join(self.path, ".metadata")
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing; not a sharded (dcp) checkpoint")
        try:
            with open(path, "rb") as f:
                meta = _MetadataUnpickler(f).load()
        except _Refused as e:
            raise CheckpointError(f"{path}: holds objects beyond DCP's index ({_first_line(e)}); evolm will "
                                  "not unpickle them, since that can run code") from None
        except (pickle.UnpicklingError, EOFError, OSError, ValueError, AttributeError, IndexError) as e:
            raise CheckpointError(f"{path}: damaged ({_first_line(e)})") from None
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


class TensorsOnlyPlanner(DefaultLoadPlanner):
    """DCP's planner, refusing entries stored as pickled bytes (DCP would ``torch.load`` them
    with ``weights_only=False``); evolm writes only tensors into the shards."""

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"shard entry {read_item.dest_index.fqn!r} is a pickled object, not a tensor; "
                              "evolm does not unpickle checkpoint objects")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
