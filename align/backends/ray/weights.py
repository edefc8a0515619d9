"""Ray backend, weight sync: object-store pushes, torch.distributed broadcasts, resyncs of restarted workers."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("align.backends.ray")


class _WeightSync:
    """RayBackend's weight sync (a mixin: state lives on the backend)."""

    # ------------------------------------------------------------------------------------------ weights
    def _state(self, kind: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        policy = self.models.policy
        if kind == "adapters":
            from peft import get_peft_model_state_dict

            state = get_peft_model_state_dict(policy)
        else:
            state = policy.state_dict()
        return {k: v.detach().to(device) for k, v in state.items()}

    def _push_weights(self, version: int, kind: str, actors: list[int] | None = None) -> None:
        """Put the weights in the object store once; every (listed) rollout worker loads them as `version`."""
        ref = self.ray.put(self._state(kind))
        targets = range(len(self.rollout_actors)) if actors is None else actors
        got = self.ray.get([self.rollout_actors[i].load_weights.remote(ref, version, kind) for i in targets],
                           timeout=self.generate_timeout_s)
        if any(v != version for v in got):
            raise RuntimeError(f"weight sync: workers report versions {got}, expected {version}")
        self.stats["weight_pushes"] += 1

    def _join_group(self) -> None:
        """Trainer = rank 0, rollout worker i = rank i + 1, for broadcast weight syncs."""
        import datetime
        import socket

        import torch.distributed as dist

        if dist.is_initialized():
            log.warning("Ray backend: torch.distributed is already in use in the trainer; weights go through the object store")
            return
        backend = "nccl" if self.models.device.type == "cuda" and self.cc.rollout_num_gpus > 0 else "gloo"
        ip = self.ray.util.get_node_ip_address()
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        init = f"tcp://{ip}:{port}"
        world = len(self.rollout_actors) + 1
        joins = [a.join_weight_group.remote(init, world, i + 1, backend) for i, a in enumerate(self.rollout_actors)]
        dist.init_process_group(backend, init_method=init, world_size=world, rank=0,
                                timeout=datetime.timedelta(seconds=self.placement_timeout_s))
        self.ray.get(joins, timeout=self.placement_timeout_s)
        self._group_backend = backend

    def _leave_group(self, workers_too: bool) -> None:
        import torch.distributed as dist

        if self._group_backend is None:
            return
        self._group_backend = None
        if workers_too:
            try:
                self.ray.get([a.leave_weight_group.remote() for a in self.rollout_actors], timeout=30)
            except Exception:  # noqa: BLE001 - a dead worker has no group to leave
                pass
        if dist.is_initialized():
            dist.destroy_process_group()

    def _broadcast_weights(self, version: int, kind: str) -> bool:
        """Broadcast to every rollout worker; False (and the group is dropped) when a worker is not the one
        that joined (restarted: version differs) or the broadcast fails."""
        from align.rollouts.worker import broadcast_flat

        ray = self.ray
        try:
            held = ray.get([a.weights_version.remote() for a in self.rollout_actors], timeout=60)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            held = None
        if held is None or any(v != self.version_pushed for v in held):
            log.warning("Ray backend: a rollout worker restarted; weights go through the object store from now on")
            self._leave_group(workers_too=True)
            return False
        device = self.models.device if self._group_backend == "nccl" else torch.device("cpu")
        state = {k: v.detach() for k, v in self._state(kind, device).items()}
        meta = [(k, tuple(v.shape), v.dtype) for k, v in state.items()]
        refs = [a.receive_weights.remote(version, kind, meta) for a in self.rollout_actors]
        broadcast_flat(state, device)
        got = ray.get(refs, timeout=self.generate_timeout_s)
        if any(v != version for v in got):
            raise RuntimeError(f"weight sync: workers report versions {got}, expected {version}")
        return True

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
        if self._group_backend is not None and self._broadcast_weights(self.version, kind):
            self.stats["weight_broadcasts"] += 1
        else:
            self._push_weights(self.version, kind)
        self.version_pushed = self.version

    def worker_state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Every rollout worker's weights (for checks that they equal the trainer's)."""
        return self.ray.get([a.state_dict.remote() for a in self.rollout_actors])
