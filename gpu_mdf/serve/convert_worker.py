"""Convert one model file (Keras ``.keras``/``.h5`` or ``.onnx``) to MDF JSON in a process
of its own, started by :mod:`.conversion` (``POST /v2/convert``, and ``model.onnx`` in a
repository). Uploaded models are untrusted. Before Keras, ONNX or the file is touched:

- resource limits: address space, CPU time, the size of any file it writes
  (``RLIMIT_FSIZE``), open files, no core dump;
- where the OS allows it (root, or unprivileged user namespaces), new user, mount and
  network namespaces: no network interface but a loopback that is down, and a tmpfs
  of ``DISK_BYTES`` as its temp folder (a byte quota the kernel enforces); elsewhere the
  parent watches the temp folder's size and stops the worker past the quota;
- an archive's member count and declared inflated size are checked against the limits
  (``zipfile`` never inflates a member past its declared size);
- Keras loads with ``safe_mode=True`` (a Lambda's code is refused, never run); an
  uploaded ONNX file may not name external data.

    python -m gpu_mdf.serve.convert_worker SRC OUT KIND NORMALIZE MODEL_ID MEMORY CPU DISK MEMBERS UPLOAD

Exit 0: OUT holds the MDF JSON. Exit 2: the model was refused; the one-line reason is
the last line on stderr. The first line on stderr says which isolation was had.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_NOSUID, MS_NODEV = 2, 4


def limit(memory: int, cpu: int, disk: int) -> None:
    for res, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, disk),
                       (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 256)):
        soft, hard = resource.getrlimit(res)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(res, (value, value))


def isolate(tmp: str, disk: int) -> str:
    """New namespaces for this process where the kernel allows them: no network, and a
    tmpfs of ``disk`` bytes on ``tmp``. Says what it got."""
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNET | CLONE_NEWNS | (0 if uid == 0 else CLONE_NEWUSER)
    if libc.unshare(flags) != 0:
        return "isolation: none (namespaces not permitted here; temp quota watched by the server)"
    if uid != 0:
        for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"0 {uid} 1"),
                           ("/proc/self/gid_map", f"0 {gid} 1")):
            try:
                with open(path, "w") as f:
                    f.write(text)
            except OSError:
                pass
    libc.mount(b"none", b"/", None, 0x40000 | 0x4000, None)     # MS_REC | MS_PRIVATE: keep mounts here
    if libc.mount(b"tmpfs", tmp.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, f"size={disk},mode=700".encode()) != 0:
        return "isolation: no network; temp quota watched by the server (tmpfs not permitted)"
    os.chdir(tmp)          # the working folder too is the tmpfs now, not the folder under it
    return "isolation: no network; temp folder a tmpfs quota"


def check_archive(src: str, max_members: int, max_bytes: int) -> None:
    """Refuse a zip (.keras) whose members, or their declared inflated size, pass the
    limits: before anything is extracted."""
    import zipfile

    from ..errors import ModelFileError
    if not zipfile.is_zipfile(src):
        return
    try:
        with zipfile.ZipFile(src) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ModelFileError(f"not a valid .keras archive ({e})") from None
    if len(infos) > max_members:
        raise ModelFileError(f"the archive has {len(infos):,} members (at most {max_members:,})")
    total = sum(i.file_size for i in infos)
    if total > max_bytes:
        raise ModelFileError(f"the archive inflates to {total:,} bytes (at most {max_bytes:,})")


def convert(src: str, out: str, kind: str, normalize: str | None, model_id: str, upload: bool) -> None:
    from ..mdf import save_mdf
    if kind == "onnx":
        from ..convert.onnx import load_onnx, onnx_to_mdf_doc
        doc = onnx_to_mdf_doc(load_onnx(src, allow_external_data=not upload), model_id=model_id,
                              normalize=normalize)
    else:
        from ..convert import keras_to_mdf, load_keras_model
        doc = keras_to_mdf(load_keras_model(src), normalize=normalize or "l2", model_id=model_id)
    save_mdf(doc, out)


def main(argv: list[str]) -> int:
    src, out, kind, normalize, model_id, memory, cpu, disk, members, upload = argv
    tmp = os.environ.get("TMPDIR", "")
    print(isolate(tmp, int(disk)) if tmp else "isolation: none", file=sys.stderr, flush=True)
    limit(int(memory), int(cpu), int(disk))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # a write past the file-size limit fails (EFBIG)
    from ..errors import GpuMdfError
    try:
        check_archive(src, int(members), int(disk))
        convert(src, out, kind, None if normalize == "-" else normalize, model_id, upload == "1")
    except GpuMdfError as e:
        print(str(e).replace(src, "the upload").replace(os.path.dirname(src) + "/", "").splitlines()[0],
              file=sys.stderr)
        return 2
    except MemoryError:
        print("the conversion ran out of its memory limit", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno == 27:      # EFBIG: RLIMIT_FSIZE
            print("the conversion wrote more than its disk limit", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
