"""Runs never share a folder: unique default names, a lock held for the whole run (by the
launcher, from its check, when there is one), a refusal naming `run-name`, and no empty
folder left by a run that failed early."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from contract.config import RunConfig, RunConfigError
from server import rundir
from server.checkpoint import FILE

REPO = Path(__file__).resolve().parents[1]


def cfg(tmp_path, **keys) -> RunConfig:
    return RunConfig(output_dir=str(tmp_path), **keys)


def test_default_names_are_unique_within_one_second(tmp_path):
    folders = []
    for _ in range(20):
        with rundir.claim(cfg(tmp_path)) as folder:
            (folder / FILE).write_bytes(b"")  # keep it: a run with a checkpoint
            folders.append(folder)
    assert len(set(folders)) == 20
    assert all(f.parent == tmp_path.resolve() for f in folders)


def test_same_run_name_twice_is_refused_naming_the_key(tmp_path):
    with rundir.claim(cfg(tmp_path, run_name="r")) as folder:
        (folder / FILE).write_bytes(b"")
    refused = r"^run-name: .*already holds a run.*resume=true"
    with pytest.raises(RunConfigError, match=refused), rundir.claim(cfg(tmp_path, run_name="r")):
        pass
    with rundir.claim(cfg(tmp_path, run_name="r", resume=True)) as again:  # resume may
        assert again == folder
    with pytest.raises(RunConfigError, match="^run-name: "):
        rundir.check(cfg(tmp_path, run_name="r"))  # the launcher's early check agrees


def test_a_held_folder_refuses_a_second_server(tmp_path):
    with rundir.claim(cfg(tmp_path, run_name="r")) as folder:
        busy = f"{folder} is in use by another run"
        with pytest.raises(RunConfigError, match=busy), rundir.claim(cfg(tmp_path, run_name="r")):
            pass
        with pytest.raises(RunConfigError, match=f"pid {os.getpid()}"):
            rundir.check(cfg(tmp_path, run_name="r"))
        assert folder.is_dir()  # the refused claim removed nothing
    rundir.check(cfg(tmp_path, run_name="r"))  # released at the end of the block


@pytest.mark.integration  # a second interpreter
def test_the_lock_is_held_across_processes_and_dies_with_its_holder(tmp_path):
    """Another process holding the folder (an orphaned ServerApp) blocks a resume."""
    holder = textwrap.dedent(
        f"""
        import sys, time
        from contract.config import RunConfig
        from server import rundir
        cfg = RunConfig(output_dir={str(tmp_path)!r}, run_name="r")
        with rundir.claim(cfg) as folder:
            (folder / "checkpoint.safetensors").write_bytes(b"")
            print("held", flush=True)
            time.sleep(120)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        busy = f"in use by another run \\(pid {proc.pid}"
        resume = cfg(tmp_path, run_name="r", resume=True)
        with pytest.raises(RunConfigError, match=busy), rundir.claim(resume):
            pass
    finally:
        proc.kill()
        proc.wait()
    with rundir.claim(cfg(tmp_path, run_name="r", resume=True)):  # SIGKILL freed it
        pass


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tmp_path):
    with pytest.raises(RuntimeError), rundir.claim(cfg(tmp_path, run_name="early")) as folder:
        (folder / "metrics.json").write_text("{}")
        raise RuntimeError("failed in round 1")
    assert not folder.exists()
    with pytest.raises(RuntimeError), rundir.claim(cfg(tmp_path)) as unnamed:
        raise RuntimeError("failed")
    assert not unnamed.exists() and list(tmp_path.iterdir()) == []
    # with a checkpoint the folder stays (resume continues it)
    with pytest.raises(RuntimeError), rundir.claim(cfg(tmp_path, run_name="late")) as late:
        (late / FILE).write_bytes(b"")
        raise RuntimeError("failed in link 2")
    assert (late / FILE).exists()
    # a folder the run did not create is not removed
    (tmp_path / "mine").mkdir()
    with pytest.raises(RuntimeError), rundir.claim(cfg(tmp_path, run_name="mine")):
        raise RuntimeError("failed")
    assert (tmp_path / "mine").is_dir()


def test_a_folder_the_launcher_holds_is_refused_to_others_and_claimed_by_its_own_server(
    tmp_path, monkeypatch
):
    named = cfg(tmp_path, run_name="r")
    with rundir.hold(named) as folder:
        assert folder == tmp_path.resolve() / "r"
        busy = "^run-name: .*in use by another run"
        with pytest.raises(RunConfigError, match=busy):  # another launcher's check
            rundir.check(named)
        with pytest.raises(RunConfigError, match=busy), rundir.hold(named):  # its hold
            pass
        with pytest.raises(RunConfigError, match=busy), rundir.claim(named):  # a ServerApp
            pass
        monkeypatch.setenv(rundir.HELD_ENV, str(folder))  # the launcher's ServerApp
        with rundir.claim(named) as claimed:
            (claimed / FILE).write_bytes(b"")
    assert (folder / FILE).exists()  # holds a run now: the launcher keeps it
    monkeypatch.delenv(rundir.HELD_ENV)
    with rundir.hold(cfg(tmp_path, run_name="r", resume=True)):  # released
        pass
    with rundir.hold(cfg(tmp_path)) as unnamed:  # a fresh run's ServerApp makes its folder
        assert unnamed is None


LAUNCHER = """
import sys
from simulation import launch

def run_app(app_dir, args, held):
    print("held", held, flush=True)
    return int(sys.stdin.readline() or 0)

launch.run_app = run_app
sys.exit(launch.main(["--run-config", "output-dir={out!r} run-name='r'"]))
"""


@pytest.mark.integration  # a second interpreter
@pytest.mark.parametrize("end", ["exit", "sigkill"])
def test_the_launchers_lock_is_released_when_it_ends_or_is_killed(tmp_path, end):
    """The real launcher (its run replaced by a wait) holds the folder from its check: a
    second claimer is refused naming its pid, and the lock goes when it ends, also when
    it is SIGKILLed (the kernel drops a dead process's flock)."""
    script = LAUNCHER.format(out=str(tmp_path))
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, **pipes)
    try:
        lines = iter(proc.stdout.readline, "")
        assert any(line.startswith("held") for line in lines)
        named = cfg(tmp_path, run_name="r")
        busy = f"in use by another run \\(pid {proc.pid}\\)"
        with pytest.raises(RunConfigError, match=busy), rundir.claim(named):
            pass
        if end == "exit":
            proc.stdin.write("0\n")
            proc.stdin.flush()
            assert proc.wait(timeout=60) == 0
        else:
            proc.kill()
            proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    with rundir.claim(named):
        pass
