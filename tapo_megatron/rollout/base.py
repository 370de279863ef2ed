"""The rollout engine interface, shared by every engine (native HF engine on CPU/GPU, SGLang on GPU).

An engine turns token prompts into sampled responses with per-token log-probs, and takes new weights from the actor:

    engine.generate(prompts: list[list[int]], params: SamplingParams) -> list[Generation]   # one per prompt, in order
    engine.update_weights(buckets, version)   # atomic: all tensors or none, then weight_version == version

Receiving ends, one per weight-sync transport, named as SGLang's endpoints and slime's engine methods are (the
transports in ``training/weight_sync`` call these and never look at the engine's type):

    engine.update_weights_from_tensor(buckets, version)          # colocated (in-process: ``update_weights``)
    engine.update_weights_from_disk(hf_dir, version)             # disk
    engine.init_weights_update_group(addr, port, name, backend, join)   # distributed: a group per server ...
    engine.begin_weight_update(version)                          # ... a session per sync ...
    engine.update_weights_from_distributed(flat, name, version, send)   # ... one broadcast per bucket ...
    engine.end_weight_update(version, ok)                        # ... closed, versioned, cache flushed

Weights travel with HF names (``model.layers.0.self_attn.q_proj.weight`` for Qwen3), in size-bounded buckets
(``list[(name, tensor)]``) so that the sender never holds a second full copy. :func:`stage_weight_buckets` is the
shared validation step: it drains the whole stream into staging copies and checks every name, shape and dtype
against the engine's expected weights before anything touches the model.
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from tapo_megatron.records import Generation, SamplingParams


class WeightUpdateError(ValueError):
    """A weight stream the engine refuses (unknown, duplicate or missing name; wrong shape or dtype)."""


@dataclass(frozen=True)
class WeightSpec:
    """What the engine expects for one named tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class RolloutEngine(abc.ABC):
    """A generation backend the RL loop drives. Implementations: ``NativeEngine`` (HF transformers), SGLang.

    Contract for every implementation:
    - ``generate`` returns one ``Generation`` per prompt, in prompt order, stamped with ``weight_version``.
      ``Generation.logprobs[i]`` is log p(token_i | prompt, tokens_<i) under the model at temperature 1 with no
      top-p truncation, in fp32: the quantity the actor recomputes, so actor-vs-engine differences measure the
      numerical mismatch only.
    - ``update_weights`` is atomic: after an exception (bad tensor, sender failure, truncated stream) the engine
      still serves the previous weights and reports the previous ``weight_version``.
    """

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        """Sample one response per prompt.

        Args:
            prompts: token ids, one list per prompt; lengths may differ (engines pad internally).
            params: temperature (0 = greedy), top_p, max_new_tokens, stop_token_ids (a sampled stop token is kept
                in the response and ends it), seed (None: drawn from the engine's own generator).

        Returns:
            ``len(prompts)`` generations, in order.
        """

    @abc.abstractmethod
    def update_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], version: int) -> None:
        """Replace all model weights from a stream of HF-named tensor buckets, atomically, then set
        ``weight_version = version``. Raises ``WeightUpdateError`` naming the offending tensor."""

    # ---- receiving ends (defaults: an in-process engine that applies a whole stream atomically)

    def update_weights_from_tensor(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], version: int) -> None:
        """Colocated transport: the bucket stream in this process (or, for SGLang, CUDA-IPC payloads)."""
        self.update_weights(buckets, version)

    def update_weights_from_disk(self, path: str, version: int) -> None:
        """Disk transport: load the HF checkpoint folder ``path`` as ``version`` (atomically)."""
        from tapo_megatron.convert.hf_io import HFCheckpointReader

        reader = HFCheckpointReader(path)
        try:
            self.update_weights(([(name, reader[name])] for name in reader), version)
        finally:
            reader.close()

    def init_weights_update_group(self, master_address: str, master_port: int, group_name: str, backend: str,
                                  join: Callable[[int], None], servers: Sequence[int] | None = None) -> None:
        """Distributed transport: make a weight-update group with the GPUs of ``servers`` (default: all);
        ``join(world_size)`` joins the trainer side as group rank 0."""
        raise WeightUpdateError(f"{type(self).__name__} runs in the trainer's process and has no weight-update "
                                f"group; use rollout.weight_sync_mode=colocated or disk")

    def destroy_weights_update_group(self, group_name: str, servers: Sequence[int] | None = None) -> None:
        """Tear the group down (best effort)."""

    def lost_groups(self) -> list[int]:
        """Servers whose side of their update group a restart destroyed (rebuild those before the next sync)."""
        return []

    def begin_weight_update(self, version: int) -> None:
        """Open a weight-update session (pause generation first)."""
        self.init_weights_update_group("", 0, "", "", lambda world: None)  # refuses: no group, no session

    def update_weights_from_distributed(self, flat, group_name: str, version: int, send: Callable[[], None],
                                        servers: Sequence[int] | None = None) -> None:
        """Announce one flattened bucket (``rollout.buckets.FlatBucket``) to ``servers``, then ``send()``
        broadcasts it."""
        self.init_weights_update_group("", 0, group_name, "", lambda world: None)

    def end_weight_update(self, version: int, ok: bool = True, reason: str = "") -> None:
        """Close the session: on success the engine serves ``version`` with a fresh cache and resumes."""

    def stale_servers(self) -> list[int]:
        """Servers (indices) that do not serve ``weight_version`` (e.g. restarted); an in-process engine: none."""
        return []

    def expected_weight_shapes(self) -> dict[str, tuple[int, ...]] | None:
        """HF name -> shape of every weight the engine's model holds (None: unknown, the check is skipped)."""
        return None

    @abc.abstractmethod
    def prompt_logprobs(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Per server (one for an in-process engine): log p(tokens[:, t] | tokens[:, :t]) for t >= 1, fp32 (the
        post-sync check, ``rollout.weight_sync_check=logprobs``)."""

    @property
    @abc.abstractmethod
    def weight_version(self) -> int:
        """Version of the weights currently served (0 before the first update)."""

    @abc.abstractmethod
    def flush_cache(self) -> None:
        """Drop any cached prefixes/KV computed with earlier weights."""

    @abc.abstractmethod
    def release_memory(self) -> dict[str, float] | None:
        """Free accelerator memory held for generation so training can use it (colocated mode); only while idle.
        May return metrics (seconds, freed bytes)."""

    @abc.abstractmethod
    def resume_memory(self) -> dict[str, float] | None:
        """Undo ``release_memory`` before the next ``generate``; may return metrics."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop the engine and free its resources; later calls to ``generate`` raise."""

    @abc.abstractmethod
    def health(self) -> bool:
        """True while the engine is alive (not shut down, not crashed); a ``release_memory`` pause is still alive."""


def check_sampling_params(params: SamplingParams) -> None:
    """Refuse sampling parameters no engine can honour, naming the field."""
    if not params.temperature >= 0.0:  # also catches NaN
        raise ValueError(f"SamplingParams.temperature={params.temperature} must be >= 0 (0 means greedy)")
    if not 0.0 < params.top_p <= 1.0:
        raise ValueError(f"SamplingParams.top_p={params.top_p} must be in (0, 1]")
    if not isinstance(params.max_new_tokens, int) or params.max_new_tokens < 1:
        raise ValueError(f"SamplingParams.max_new_tokens={params.max_new_tokens!r} must be an integer >= 1")
    for token in params.stop_token_ids:
        if not isinstance(token, int) or token < 0:
            raise ValueError(f"SamplingParams.stop_token_ids contains {token!r}; token ids are integers >= 0")


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
    """Refuse empty prompts and out-of-vocabulary ids, naming the prompt index."""
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        low, high = min(prompt), max(prompt)
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"prompt {i} has token id {bad} outside the vocabulary [0, {vocab_size})")


def stage_weight_buckets(
    buckets: Iterable[list[tuple[str, torch.Tensor]]],
    expected: Mapping[str, WeightSpec],
    *,
    device: torch.device | str,
    optional: Iterable[str] = (),
    owned: bool = False,
) -> dict[str, torch.Tensor]:
    """Drain a weight stream into staging copies, validating every tensor; touch no model.

    Args:
        buckets: iterable of buckets, each a list of (HF name, tensor). The sender may reuse its bucket memory once
            the next bucket is requested, hence the copies.
        expected: name -> WeightSpec of every tensor the stream must contain.
        device: where the staging copies live (the engine's device).
        optional: names that may arrive but need not (e.g. a tied ``lm_head.weight``); they must still match
            ``expected`` when they do.
        owned: the caller hands over tensors nobody else holds (e.g. received by broadcast): stage them without a
            copy when they are already on ``device``.

    Returns:
        name -> staged tensor (detached copy on ``device``), containing every required name.

    Raises:
        WeightUpdateError: unknown, duplicate or missing name, wrong shape or dtype, non-tensor value (the first
            one found). After such an error the rest of the stream is still consumed, unstaged, so that a sender
            that runs collectives per bucket finishes on every rank instead of hanging.
        Anything the stream itself raises propagates unchanged; nothing has been applied in either case.
    """
    optional = set(optional)
    staged: dict[str, torch.Tensor] = {}
    error: WeightUpdateError | None = None
    for bucket_index, bucket in enumerate(buckets):
        if error is not None:
            continue  # keep draining: a sender doing collectives per bucket must reach its end on every rank
        for name, tensor in bucket:
            error = _check_tensor(name, tensor, bucket_index, expected, staged)
            if error is not None:
                staged.clear()  # free the staging copies now; nothing will be applied
                break
            staged[name] = tensor.detach().to(device=device, copy=not owned)
    if error is not None:
        raise error
    missing = [name for name in expected if name not in staged and name not in optional]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise WeightUpdateError(f"weight stream ended without {len(missing)} tensor(s): {shown}")
    return staged


def _check_tensor(
    name: str, tensor: object, bucket_index: int, expected: Mapping[str, WeightSpec], staged: Mapping[str, torch.Tensor]
) -> WeightUpdateError | None:
    """The error for one streamed tensor, or None when it matches its spec."""
    where = f"tensor {name!r} (bucket {bucket_index})"
    if name not in expected:
        return WeightUpdateError(f"{where}: unknown name; the engine's model has no such weight")
    if name in staged:
        return WeightUpdateError(f"{where}: sent twice in one update")
    if not isinstance(tensor, torch.Tensor):
        return WeightUpdateError(f"{where}: expected a torch.Tensor, got {type(tensor).__name__}")
    spec = expected[name]
    if tuple(tensor.shape) != spec.shape:
        return WeightUpdateError(f"{where}: shape {tuple(tensor.shape)} != expected {spec.shape}")
    if tensor.dtype != spec.dtype:
        return WeightUpdateError(f"{where}: dtype {tensor.dtype} != expected {spec.dtype}")
    return None
