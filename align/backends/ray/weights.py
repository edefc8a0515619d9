"""Ray backend, weight sync: object-store pushes, bucketed broadcasts in a private group, resyncs of restarted
workers, and recovery from a broadcast that fails or stalls (align.rollouts.weight_buckets)."""
from __future__ import annotations

import logging
import socket

import torch

from align.rollouts.weight_buckets import (
    WeightChannel,
    WeightSyncError,
    distinct_tensors,
    full_tensor,
    plan_buckets,
    send_buckets,
)

log = logging.getLogger("align.backends.ray")


def nccl_group_possible(trainer_uuid: str, worker_uuids: list[str]) -> tuple[bool, str]:
    """NCCL refuses two ranks on one GPU ("Duplicate GPU detected", GPU_READINESS F1): on one node the driver's
    GPU is not Ray's to hand out, so a rollout actor can be given the trainer's GPU."""
    ranks = [trainer_uuid, *worker_uuids]
    if any(not u for u in ranks):
        return False, "a rank reports no GPU"
    for i, u in enumerate(ranks):
        j = ranks.index(u)
        if j != i:
            who = "the trainer" if j == 0 else f"rollout worker {j - 1}"
            return False, f"rollout worker {i - 1} shares a GPU with {who} (uuid {u})"
    return True, ""


class _WeightSync:
    """RayBackend's weight sync (a mixin: state lives on the backend)."""

    _channel: WeightChannel | None = None
    _on_bucket = None  # called with each bucket's index after it is sent (progress; tests time faults with it)

    # ------------------------------------------------------------------------------------------ weights
    def _live_state(self, kind: str) -> dict[str, torch.Tensor]:
        """The policy's tensors, not copied (sharded DTensors stay sharded): adapters only with LoRA."""
        policy = self.models.policy
        if kind == "adapters":
            from peft import get_peft_model_state_dict

            return get_peft_model_state_dict(policy)
        return policy.state_dict()

    def _state(self, kind: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return {k: full_tensor(v.detach()).to(device) for k, v in self._live_state(kind).items()}

    def _push_weights(self, version: int, kind: str, actors: list[int] | None = None) -> None:
        """Put the weights in the object store once; every (listed) rollout worker loads them as `version`."""
        targets = list(range(len(self.rollout_actors)) if actors is None else actors)
        if not targets:
            return
        ref = self.ray.put(self._state(kind))
        got = self.ray.get([self.rollout_actors[i].load_weights.remote(ref, version, kind) for i in targets],
                           timeout=self.generate_timeout_s)
        if any(v != version for v in got):
            raise RuntimeError(f"weight sync: workers report versions {got}, expected {version}")
        self.stats["weight_pushes"] += 1

    def _join_group(self) -> None:
        """Trainer = rank 0, rollout worker i = rank i + 1 of a private broadcast group (not torch's default group,
        which the trainer's own ranks may hold). Anything that stops the group from forming leaves the object store
        in charge, with a warning."""
        ray = self.ray
        nccl = self.models.device.type == "cuda" and self.cc.rollout_num_gpus > 0
        backend = "nccl" if nccl else "gloo"
        timeout = self.cc.weight_sync_timeout_s
        if nccl:
            uuids = ray.get([a.device_uuid.remote() for a in self.rollout_actors], timeout=self.placement_timeout_s)
            ok, why = nccl_group_possible(str(torch.cuda.get_device_properties(self.models.device).uuid), uuids)
            if not ok:
                log.warning("Ray backend: no NCCL weight broadcast (%s); weights go through the object store", why)
                return
        host = ray.util.get_node_ip_address()
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        world = len(self.rollout_actors) + 1
        joins = [a.join_weight_group.remote(host, port, world, i + 1, backend, timeout) for i, a in enumerate(self.rollout_actors)]
        device = self.models.device if nccl else torch.device("cpu")
        try:
            self._channel = WeightChannel(host, port, 0, world, backend, timeout, device)
            ray.get(joins, timeout=timeout)
            self._group_pids = [h["pid"] for h in ray.get([a.health.remote() for a in self.rollout_actors], timeout=timeout)]
        except Exception as err:  # noqa: BLE001 - any failure to form the group: fall back, do not crash the run
            log.warning("Ray backend: the weight broadcast group did not form (%s: %s); weights go through the "
                        "object store", type(err).__name__, str(err).strip().splitlines()[0] if str(err).strip() else "")
            self._leave_group(workers_too=True)
            return
        self._group_backend = backend

    def _leave_group(self, workers_too: bool) -> None:
        channel, self._channel = self._channel, None
        self._group_backend = None
        if channel is None:
            return
        channel.close()
        if workers_too:
            try:
                self.ray.get([a.leave_weight_group.remote() for a in self.rollout_actors], timeout=30)
            except Exception:  # noqa: BLE001 - a dead or busy worker: its group dies with it / times out
                pass

    def _check_receivers(self, refs: list) -> None:
        """Raise when a receiver's task already ended badly (its actor died): the broadcast would wait for it."""
        ray = self.ray
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            try:
                ray.get(ref, timeout=0)
            except Exception as err:  # noqa: BLE001 - RayActorError, a raise in receive_weights, ...
                i = refs.index(ref)
                lines = [x.strip() for x in str(getattr(err, "cause", None) or err).splitlines() if x.strip()]
                raise WeightSyncError(f"weight sync: rollout worker {i} failed while receiving: {type(err).__name__}: "
                                      f"{lines[-1] if lines else ''}") from None

    def _broadcast_weights(self, version: int, kind: str) -> bool:
        """Broadcast to every rollout worker in buckets; False (and the group is dropped) when a worker is not the
        one that joined (restarted). A broadcast that fails or stalls raises WeightSyncError (bounded)."""
        ray = self.ray
        timeout = self.cc.weight_sync_timeout_s
        try:
            held = ray.get([a.weights_version.remote() for a in self.rollout_actors], timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise WeightSyncError(f"weight sync: a rollout worker did not answer within {timeout:g} s (busy or stalled)") from None
        except ray.exceptions.RayError:
            held = None
        if held is None or any(v != self.version_pushed for v in held):
            log.warning("Ray backend: a rollout worker restarted; weights go through the object store from now on")
            self._leave_group(workers_too=True)
            return False
        entries, tensors = distinct_tensors(self._live_state(kind))
        buckets = plan_buckets(entries, int(self.cc.weight_sync_bucket_mb * 2**20))
        refs = [a.receive_weights.remote(version, kind, entries, buckets) for a in self.rollout_actors]
        sent = send_buckets(tensors, entries, buckets, self._channel, self._channel.device,
                            check=lambda: self._check_receivers(refs), on_bucket=self._on_bucket)
        try:
            got = ray.get(refs, timeout=self.cc.weight_sync_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise WeightSyncError(f"weight sync: a rollout worker did not confirm version {version} within "
                                  f"{self.cc.weight_sync_timeout_s:g} s") from None
        except ray.exceptions.RayError:
            self._check_receivers(refs)  # names the worker
            raise
        if any(v != version for v in got):
            raise WeightSyncError(f"weight sync: workers report versions {got}, expected {version}")
        # what the last broadcast sent (a metric per step; the tests bound the buffer by the bucket size)
        self.last_broadcast = {"buckets": sent["buckets"], "tensors": len(entries), "bytes": sent["bytes"],
                               "largest_buffer_bytes": sent["largest_buffer_bytes"]}
        return True

    def _recover(self, version: int, err: BaseException) -> None:
        """After a failed broadcast: drop the group (object store from now on), replace dead or stalled workers,
        resync restarted ones, and give every other worker the full weights (a failed receive wrote part of them)."""
        log.warning("Ray backend: %s; recovering through the object store", err)
        self.stats["sync_failures"] += 1
        pids = getattr(self, "_group_pids", [])
        self._leave_group(workers_too=False)
        healthy = []
        for i, actor in enumerate(self.rollout_actors):
            try:
                pid = self.ray.get(actor.health.remote(), timeout=min(60.0, self.cc.weight_sync_timeout_s))["pid"]
            except (self.ray.exceptions.RayError, self.ray.exceptions.GetTimeoutError):
                self._replace_rollout(i)  # dead for good, or stalled: a new actor with the current weights
                continue
            if i < len(pids) and pid != pids[i]:
                self._resync(i)  # Ray restarted it: rebuild this run's model, then the full weights
            else:
                healthy.append(i)
        try:
            self.ray.get([self.rollout_actors[i].leave_weight_group.remote() for i in healthy], timeout=30)
        except Exception:  # noqa: BLE001 - best effort
            pass
        self._push_weights(version, "full", healthy)

    def _resync(self, i: int) -> None:
        """A worker lost its weights (restart) or missed a sync: give it the trainer's current full weights.
        A restarted worker is a new process outside the broadcast group, so the group is dropped."""
        self._leave_group(workers_too=True)
        # a restart re-ran the constructor with the arguments the actor was created with (a warm actor may
        # have served another model since): rebuild this run's model first
        self.ray.get(self.rollout_actors[i].reset.remote(*self._worker_args()[:3]), timeout=self.placement_timeout_s)
        self._push_weights(self.version, "full", [i])
        self.stats["resyncs"] += 1

    def sync(self, version: int) -> None:
        self.version = int(version)
        kind = "adapters" if self.models.lora else "full"
        broadcast = False
        if self._channel is not None:
            try:
                broadcast = self._broadcast_weights(self.version, kind)
            except WeightSyncError as err:
                self._recover(self.version, err)
                self.version_pushed = self.version
                return
        if broadcast:
            self.stats["weight_broadcasts"] += 1
        else:
            self._push_weights(self.version, kind)
        self.version_pushed = self.version

    def worker_state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Every rollout worker's weights (for checks that they equal the trainer's)."""
        return self.ray.get([a.state_dict.remote() for a in self.rollout_actors])
