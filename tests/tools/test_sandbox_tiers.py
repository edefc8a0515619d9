"""Sandbox tiers that never degrade silently, private scratch space, bounded and always cleaned (issue 13, items
2 and the sandbox half of 3). Each test pins one red-team finding; CI runs as root, so the tests that need an
unprivileged victim (a checkpoint, a process) or an unprivileged trainer make their own uid (63500, outside the
61000-62999 range the sandbox drops programs to)."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import align.tools.sandbox as sbx
from align.tools.sandbox import TIERS, Sandbox, SandboxConfig, SandboxUnavailableError, detect_isolation

REPO = Path(__file__).resolve().parents[2]
VICTIM_UID = 63500
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="making a second uid needs root (CI runs as root)")


# Loads `align` from this checkout in a child interpreter, ahead of any installed (editable) copy: the child
# then runs the same code as this test (and the pre-fix check can point REPO at an older checkout).
BOOT = ("import importlib.util as u, sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        f"p = u.spec_from_file_location('align', {str(REPO / 'align' / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(REPO / 'align')!r}])\n"
        "m = u.module_from_spec(p); sys.modules['align'] = m; p.loader.exec_module(m)\n")


def _bwrap_works() -> bool:
    return bool(shutil.which("bwrap")) and subprocess.run(
        ["bwrap", "--ro-bind", "/", "/", "--unshare-pid", "--unshare-net", "true"], capture_output=True).returncode == 0


def _install_entries_in_tmp() -> set[str]:
    """Top-level /tmp names the sandbox keeps as mount points when the Python install lives under /tmp (a venv
    in a clone under /tmp, as the clean-clone CI has): the scratch root holds them besides the program's dir."""
    roots = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable)))}
    return {Path(r).relative_to("/tmp").parts[0] for r in roots if r.startswith("/tmp/")}


def _tier_or_skip(tier: str) -> str:
    if detect_isolation(tier) != tier:
        pytest.skip(f"the {tier} tier does not start on this machine")
    return tier


def _box(tier: str, **kw) -> Sandbox:
    return Sandbox(SandboxConfig(prefer=tier, min_isolation=tier, workers=1, timeout_s=kw.pop("timeout_s", 5.0), **kw))


def _drop_to_victim():
    os.setgroups([])
    os.setgid(VICTIM_UID)
    os.setuid(VICTIM_UID)


# ------------------------------------------------------------------------------------ no silent downgrade
def test_a_venv_reached_through_a_symlink_still_gets_bwrap(tmp_path):
    # red team: /tmp/link -> the venv, run as /tmp/link/bin/python: bwrap's probe failed, unshare won silently
    if not _bwrap_works():
        pytest.skip("bwrap does not run here")
    venv = Path(sys.prefix)
    if venv == Path(sys.base_prefix):
        pytest.skip("not running from a venv")
    link = tmp_path / "venv-link"
    link.symlink_to(venv.resolve(), target_is_directory=True)
    python = link / "bin" / Path(sys.executable).name
    out = subprocess.run([str(python), "-c", BOOT + "from align.tools.sandbox import detect_isolation as d; print(d())"],
                         capture_output=True, text=True, timeout=60, cwd="/", env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.strip() == "bwrap", out.stderr[-500:]


def test_a_failing_stronger_tier_is_logged_and_reported(monkeypatch, caplog):
    monkeypatch.setattr(sbx, "_tier_cache", {})
    monkeypatch.setattr(sbx, "_tier_failures", {})
    real = sbx.command

    def broken_bwrap(tier, *a, **kw):
        argv, env = real(tier, *a, **kw)
        return (["bwrap", "--no-such-flag", *argv[1:]] if tier == "bwrap" else argv), env

    monkeypatch.setattr(sbx, "command", broken_bwrap)
    with caplog.at_level(logging.WARNING, logger="align.tools.sandbox"):
        got = detect_isolation("bwrap")
    assert got != "bwrap"
    assert "bwrap" in sbx.isolation_failures() and "did not start" in sbx.isolation_failures()["bwrap"]
    assert any("bwrap tier is unavailable" in r.getMessage() for r in caplog.records)
    if got != "none":
        assert Sandbox(SandboxConfig(workers=1)).isolation_failures.keys() == {"bwrap"}


def test_code_rewards_pin_the_strongest_tier_and_take_weaker_ones_only_by_name(monkeypatch):
    from align.rewards.verifiers.code_tests import CodeTests

    strongest = detect_isolation("bwrap")
    if strongest in ("none", "rlimits"):
        with pytest.raises(SandboxUnavailableError):
            CodeTests()
        return
    r = CodeTests(timeout_s=2)
    assert r.isolation == strongest
    out = r.score([""], ["def add(a, b): return a + b"], tests=[["assert add(1, 2) == 3"]])
    assert out.scores == [1.0] and out.info[0]["isolation"] == strongest
    # a machine where only rlimits starts: refused unless named
    monkeypatch.setattr(sbx, "_tier_cache", {"bwrap": "rlimits", "rlimits": "rlimits"})
    with pytest.raises(SandboxUnavailableError, match="isolation='rlimits'"):
        CodeTests()
    assert CodeTests(isolation="rlimits").isolation == "rlimits"
    with pytest.raises(SandboxUnavailableError, match="not a sandbox tier"):
        CodeTests(isolation="chroot")


def test_a_tier_that_disappears_fails_the_run_instead_of_running_weaker(monkeypatch):
    from align.rewards.verifiers.code_tests import CodeTests
    from align.tools import tier_policy

    tier = detect_isolation("bwrap")
    if tier in ("none", "rlimits"):
        pytest.skip("no namespace tier here")
    box = _box(tier)
    reward = CodeTests(timeout_s=2)
    monkeypatch.setattr(tier_policy, "required_sandbox", lambda t: box)
    try:
        assert reward.score([""], ["x = 1"], tests=[["assert x == 1"]]).scores == [1.0]
        worker = box._idle.get()
        worker.close()  # the worker goes, and no fresh one can start at the pinned tier any more
        box._idle.put(worker)

        def cannot_start(*a, **kw):
            raise RuntimeError(f"{tier} zygote did not start: EOFError")

        monkeypatch.setattr(sbx, "_spawn", cannot_start)
        with pytest.raises(SandboxUnavailableError, match=f"'{tier}' tier no longer starts"):
            reward.score([""], ["x = 1"], tests=[["assert x == 1"]])
    finally:
        box.close()


def test_step_metrics_count_the_tier_of_every_sandboxed_sample():
    from align.trainer.reward_metrics import sandbox_tier_counts

    infos = [{"isolation": "bwrap", "passed": 1}, {"reason": "no code"},
             {"components": {}, "component_info": {"code_tests": {"isolation": "bwrap"}, "fmt": {}}},
             {"isolation": "unshare"}]
    assert sandbox_tier_counts(infos) == {"reward/sandbox_rlimits": 0.0, "reward/sandbox_unshare": 1.0,
                                          "reward/sandbox_bwrap": 2.0}
    assert sandbox_tier_counts([{}, {"score": 1.0}]) == {}  # no code reward: no new keys
    assert set(TIERS) == {"rlimits", "unshare", "bwrap"}


# ------------------------------------------------------------------------------------ what each tier isolates
HOST_WRITES = """
import os
for d in ('/tmp', '/var/tmp', '/dev/shm'):
    try:
        with open(os.path.join(d, {name!r}), 'w') as f:
            f.write('persist')
        print('wrote', d)
    except OSError as e:
        print('refused', d, type(e).__name__)
"""


@pytest.mark.parametrize("tier", ["unshare", "rlimits"])
def test_no_persistent_files_in_the_host_tmp_directories(tier):
    # red team: under unshare and rlimits a program wrote files to host /tmp, /var/tmp, /dev/shm that stayed
    _tier_or_skip(tier)
    if tier == "rlimits" and not ROOT:
        pytest.skip("rlimits without root runs the program as our own uid: documented, not preventable")
    name = f"align-persist-{os.getpid()}-{tier}"
    box = _box(tier)
    try:
        res = box.run(HOST_WRITES.format(name=name))
        assert res.status == "ok", res.stderr
        if tier == "unshare":  # a private tmpfs over each of them, writable only inside the run's scratch
            assert res.stdout.count("refused") == 3, res.stdout
        later = box.run("import os\nprint(sorted(os.listdir('/tmp')), os.environ['TMPDIR'] == os.getcwd())")
        assert later.stdout.strip().endswith("True"), later.stdout
    finally:
        box.close()
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        assert not os.path.exists(os.path.join(d, name)), f"{d}/{name} persisted after a {tier} run"


def test_rlimits_cannot_hide_proc_but_the_namespace_tiers_do():
    # red team: under rlimits a program read another process's command line (a --token=); documented as the
    # tier's limit (no PID namespace, no private /proc) and the reason code rewards refuse it by default.
    secret = f"--token=align-secret-{os.getpid()}"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", secret])
    code = ("import os\nfound = False\nfor p in os.listdir('/proc'):\n    try:\n"
            "        found |= b'align-secret' in open(f'/proc/{p}/cmdline', 'rb').read()\n"
            "    except OSError:\n        pass\nprint('FOUND' if found else 'HIDDEN')")
    try:
        for tier in ("bwrap", "unshare", "rlimits"):
            if detect_isolation(tier) != tier:
                continue
            box = _box(tier)
            try:
                res = box.run(code)
            finally:
                box.close()
            assert res.stdout.strip() == ("FOUND" if tier == "rlimits" else "HIDDEN"), (tier, res.stdout, res.stderr)
    finally:
        other.kill()
        other.wait()


HOSTILE_TO_TRAINER = """
import os, signal
try:
    open({ckpt!r}, 'w').write('pwned')
    print('WROTE')
except OSError as e:
    print('write refused', type(e).__name__)
os.system('umount /tmp 2>/dev/null; mount -o remount,rw / 2>/dev/null; touch {extra} 2>/dev/null && echo TOUCHED')
for d in ('/', '/dev', '/dev/shm', '/sandbox', '/usr', '/etc', '/home', '/mnt', '/opt', '/srv', '/var/lib', '/tmp'):
    try:  # a writable place outside the sized scratch tmpfs would be RAM or disk nobody counts or cleans
        with open(os.path.join(d, 'align-w-probe'), 'w') as f:
            f.write('x')
        print('WRITABLE', d)
        os.unlink(os.path.join(d, 'align-w-probe'))
    except OSError:
        pass
try:
    os.kill(-1, signal.SIGKILL)
except OSError as e:
    print('kill', type(e).__name__)
"""


def _writable(stdout: str) -> set[str]:
    return {line.split()[1] for line in stdout.splitlines() if line.startswith("WRITABLE")}


def _victim(tmp_root: str):
    """A trainer-owned run directory with a checkpoint, and a process of that trainer's uid."""
    d = tempfile.mkdtemp(dir=tmp_root, prefix="align-victim-")
    os.chmod(d, 0o755)
    ckpt = os.path.join(d, "trainer.pt")
    Path(ckpt).write_text("weights")
    for p in (d, ckpt):
        os.chown(p, VICTIM_UID, VICTIM_UID)
    proc = subprocess.Popen(["sleep", "60"], preexec_fn=_drop_to_victim)
    return d, ckpt, proc


@needs_root
@pytest.mark.parametrize("tier", TIERS)
def test_a_dropped_uid_program_cannot_touch_another_uids_checkpoint_or_processes(tier):
    _tier_or_skip(tier)
    d, ckpt, victim = _victim("/var/lib" if os.path.isdir("/var/lib") else "/srv")
    box = _box(tier)
    try:
        res = box.run(HOSTILE_TO_TRAINER.format(ckpt=ckpt, extra=os.path.join(d, "planted")))
        assert "WROTE" not in res.stdout and "TOUCHED" not in res.stdout, res.stdout
        # a dropped uid writes only inside its own scratch directory (rlimits: also the host tmp dirs, emptied after)
        allowed = {"/tmp", "/dev/shm"} if tier == "rlimits" else set()
        assert _writable(res.stdout) <= allowed, res.stdout
        time.sleep(0.1)
        assert victim.poll() is None, "the program killed another uid's process"
        assert Path(ckpt).read_text() == "weights" and os.listdir(d) == ["trainer.pt"]
    finally:
        box.close()
        victim.kill()
        victim.wait()
        shutil.rmtree(d)


def _unprivileged_python() -> str | None:
    for cand in (os.path.realpath(sys.executable), "/usr/bin/python3"):
        p = Path(cand)
        if p.exists() and all(q.stat().st_mode & 0o001 for q in [p.parent, *p.parent.parents]):
            ver = subprocess.run([cand, "-c", "import sys; print(sys.version_info >= (3, 10))"], capture_output=True,
                                 text=True, preexec_fn=_drop_to_victim)
            if ver.stdout.strip() == "True":
                return cand
    return None


@needs_root
@pytest.mark.parametrize("tier", ["bwrap", "unshare"])
def test_an_unprivileged_trainer_keeps_its_checkpoint_and_its_processes(tier):
    # red team: as a non-root user, a program overwrote the trainer's checkpoint (unshare: the program is uid 0
    # of a user namespace that owns the trainer's files) and os.kill(-1, 9) killed the trainer (rlimits).
    python = _unprivileged_python()
    if python is None or not all(q.stat().st_mode & 0o001 for q in [REPO, *REPO.parents]):
        pytest.skip("no Python / checkout an unprivileged uid can run")
    d, ckpt, victim = _victim("/var/lib" if os.path.isdir("/var/lib") else "/srv")
    prog = HOSTILE_TO_TRAINER.format(ckpt=ckpt, extra=os.path.join(d, "planted"))
    code = BOOT + (f"import align.tools.sandbox as s\nt = s.detect_isolation({tier!r})\nif t != {tier!r}:\n"
                   f"    print('SKIP', s.isolation_failures()); raise SystemExit\n"
                   f"b = s.Sandbox(s.SandboxConfig(prefer=t, min_isolation=t, workers=1))\n"
                   f"r = b.run({prog!r})\nprint(r.status)\nprint(r.stdout)\nprint(r.stderr[-300:])\nb.close()\n")
    try:
        out = subprocess.run([python, "-I", "-c", code], preexec_fn=_drop_to_victim, capture_output=True, text=True,
                             timeout=60, cwd="/", env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
        if out.stdout.startswith("SKIP"):
            pytest.skip(f"{tier} does not start for an unprivileged uid here: {out.stdout.strip()}")
        assert out.returncode == 0, out.stderr[-800:]
        assert "WROTE" not in out.stdout and "TOUCHED" not in out.stdout, out.stdout
        # the program owns the namespace's files: only the sized scratch tmpfs (unshare binds it at /dev/shm too)
        assert _writable(out.stdout) <= ({"/tmp"} if tier == "bwrap" else {"/tmp", "/dev/shm"}), out.stdout
        assert victim.poll() is None
        assert Path(ckpt).read_text() == "weights" and os.listdir(d) == ["trainer.pt"]
    finally:
        victim.kill()
        victim.wait()
        shutil.rmtree(d)


# ------------------------------------------------------------------------------------ scratch: bounded, cleaned
def _mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no MemAvailable")


FLOOD = """
import os
n, i = 0, 0
try:
    while n < 2 * 1024**3:  # 2 GB in 8 MB files (each under file_mb): only the scratch's size can stop it
        with open(f'f{i}', 'wb') as f:
            for _ in range(8):
                f.write(b'0' * 1024**2)
                n += 1024**2
        i += 1
    print('WROTE', n >> 20)
except OSError as e:
    print('STOPPED', n >> 20, e.errno)
"""


@pytest.mark.parametrize("tier", ["bwrap", "unshare"])
def test_a_2gb_scratch_flood_under_memory_mb_256_is_stopped_and_leaves_nothing(tier):
    # red team: bwrap's in-RAM /tmp was not counted by memory_mb (5 GB written in 4.5 s under memory_mb=1024)
    _tier_or_skip(tier)
    box = _box(tier, memory_mb=256)  # the default scratch_mb: 64
    try:
        assert box.run("print(1)").stdout == "1\n"  # warm worker: its own start-up is not the program's memory
        before = _mem_available_mb()
        t0 = time.monotonic()
        res = box.run(FLOOD, memory_mb=256)
        words = res.stdout.split()
        assert words[:1] == ["STOPPED"], (res.status, res.stdout, res.stderr[-300:])
        assert int(words[1]) <= 64  # the tmpfs is scratch_mb (64) and that RAM comes out of memory_mb
        keep = sorted(_install_entries_in_tmp())
        probe = box.run(f"import os\nprint(sorted(set(os.listdir('/tmp')) - set({keep!r})) == [os.path.basename(os.getcwd())])")
        elapsed = time.monotonic() - t0
        after = _mem_available_mb()
        assert probe.stdout == "True\n", probe.stdout  # only the probe's own scratch dir: the root was emptied
        assert elapsed < 5.0
        assert after > before - 100, (before, after)
    finally:
        box.close()


@needs_root
def test_rlimits_scratch_flood_is_stopped_and_removed():
    # no mount namespace: the scratch is a host directory, measured while the program runs
    _tier_or_skip("rlimits")
    box = _box("rlimits")  # the default scratch_mb: 64
    try:
        t0 = time.monotonic()
        res = box.run(FLOOD)
        assert "WROTE" not in res.stdout and "scratch space over 64 MB" in res.stderr, (res.stdout, res.stderr[-300:])
        worker = box._idle.get()
        box._idle.put(worker)
        assert os.listdir(worker.scratch_root) == [] and time.monotonic() - t0 < 5.0
    finally:
        box.close()


DEEP_TREE = """
import os, struct
for i in range(1200):  # 1,200 deep: the old os.walk clean-up crashed past PATH_MAX and leaked it all
    os.mkdir('d')
    os.chdir('d')
    with open('x', 'wb') as f:
        f.write(b'y' * 1000)
    os.symlink('..', 'loop')  # a symlink loop at every level
    os.symlink('/', 'root')
with open('pinned', 'w') as f:
    try:  # chattr +i: refused for an unprivileged uid, and must not stop the clean-up either way
        import fcntl  # (not importable under rlimits when the Python install is closed to the dropped uid)
        fcntl.ioctl(f, 0x40086602, struct.pack('l', 0x10))
        print('IMMUTABLE')
    except (OSError, ImportError):
        pass
os.chdir('/'.join(['..'] * 600))
os.chmod('d', 0)  # a mode 000 directory in the middle, and a read-only one at the top
os.chdir('/'.join(['..'] * 600))
os.chmod('d', 0o500)
print('BUILT')
"""


@pytest.mark.parametrize("tier", TIERS)
def test_a_1200_deep_tree_with_loops_and_chmod_000_is_removed(tier):
    _tier_or_skip(tier)
    box = _box(tier)
    try:
        res = box.run(DEEP_TREE)
        assert "IMMUTABLE" not in res.stdout
        # rlimits measures its disk scratch while the program runs and may stop it past 64 levels first
        stopped = tier == "rlimits" and "scratch space over" in res.stderr
        assert "BUILT" in res.stdout or stopped, (res.stdout, res.stderr[-300:])
        if tier == "rlimits":  # the host-side scratch root is visible to us: it must be empty
            worker = box._idle.get()
            box._idle.put(worker)
            assert os.listdir(worker.scratch_root) == []
        else:
            keep = sorted(_install_entries_in_tmp())
            probe = box.run(f"import os\nprint(len(set(os.listdir('..')) - set({keep!r})))")
            assert probe.stdout == "1\n", probe.stdout  # the scratch root holds only the probe's own directory
    finally:
        box.close()


def test_clear_dir_removes_any_tree_without_recursion(tmp_path):
    from align.tools._scratch import clear_dir

    # on a tmpfs like the sandbox's scratch (an ext4 rmdir costs ~1.6 ms on the shared CI disk)
    base = Path(tempfile.mkdtemp(dir="/dev/shm")) if os.access("/dev/shm", os.W_OK) else tmp_path
    root = base / "scratch"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY)
    for _ in range(5000):  # far past PATH_MAX (4096) and the recursion limit
        os.mkdir("d", dir_fd=fd)
        nxt = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nxt
        os.symlink("..", "up", dir_fd=fd)
        os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
        if ROOT:
            os.chown("f", VICTIM_UID, VICTIM_UID, dir_fd=fd, follow_symlinks=False)
    os.close(fd)
    (root / "wide").mkdir()
    for i in range(2000):
        (root / "wide" / str(i)).mkdir()
    (root / "closed").mkdir()
    (root / "closed" / "inner").write_text("x")
    (root / "closed").chmod(0)
    (root / "keep-me").write_text("kept")
    t0 = time.monotonic()
    assert clear_dir(str(root), keep={"keep-me"}) == 0
    assert time.monotonic() - t0 < 10
    assert os.listdir(root) == ["keep-me"]
    shutil.rmtree(base, ignore_errors=True)


def test_a_training_step_logs_the_tier_its_code_reward_ran_at(tiny_model_path, tmp_path):
    import json

    import align
    from align.rewards.verifiers.code_tests import CodeTests
    from align.testing import tiny_run_config

    tier = detect_isolation("bwrap")
    if tier in ("none", "rlimits"):
        pytest.skip("no namespace tier here")
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"def f(): return {i}", "tests": ["assert f() == 0"]}) + "\n"
                            for i in range(4)))
    cfg = tiny_run_config("grpo", tiny_model_path, data, tmp_path / "run", CodeTests(timeout_s=2),
                          algo={"group_size": 2}, train={"device": "cpu"})
    align.train(cfg)
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    # 2 prompts x group 2 = 4 samples, each graded in the sandbox (random tiny-model text still runs: it errors)
    assert line[f"reward/sandbox_{tier}"] == 4.0
    assert sum(line[f"reward/sandbox_{t}"] for t in TIERS) == 4.0
