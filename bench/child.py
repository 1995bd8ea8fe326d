"""Measurements made in a fresh process (its peak memory, allocator and imports are its own)."""
import subprocess


def child_stdout(cmd: list[str], what: str, **kwargs) -> str:
    """The stdout of `cmd`, run to its end; where it fails, a SystemExit that names `what` and shows the end of its
    stderr (its one-line error, or a bug's traceback), which a CalledProcessError would hide."""
    out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if out.returncode:
        raise SystemExit(f"{what} failed (exit status {out.returncode}):\n{out.stderr[-3000:].rstrip()}")
    return out.stdout
