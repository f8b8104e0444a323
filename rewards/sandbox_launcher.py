"""The first code that runs inside the sandbox: isolate, drop privileges, limit, then run.

Not imported by slime-rl: :mod:`slime_rl.rewards.sandbox` passes this file's text, after that
of ``sandbox_judge.py`` (both standard library only), to ``python -I -c`` with a JSON spec as
``argv[1]``.

    [inside unshare --mount --net --pid ... (root, or root of a fresh user namespace)]
      isolate():  tmpfs new root <- read-only binds of the system and interpreter folders
                  + fresh /proc + minimal /dev + one size/inode-capped tmpfs for /tmp,
                  /var/tmp, /dev/shm and the work folder -> chroot
      drop():     setuid(nobody) as host root; otherwise no capabilities, no new user
                  namespaces, no new privileges
      without tests: setrlimit -> [audit hook] -> exec main.py as __main__
      with tests:    not dumpable -> fork
                       child (candidate): close the secret and verdict fds -> setrlimit ->
                                          [audit hook] -> main.py -> serve the judge
                       this process (judge): setrlimit -> read the secret (test code + nonce)
                                          -> run the tests against the child over pipes
                                          -> nonce to the verdict pipe if they all passed

The spec (argv) never holds the test code or the nonce; only the judge ever reads them, after
the fork, so they are in no memory the program can reach (see sandbox_judge).
"""

import ctypes
import json
import os
import resource
import sys
import traceback
import types

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
PR_SET_DUMPABLE = 4
_DEVICES = ("null", "zero", "full", "random", "urandom")


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _mount(libc, src, target, fstype, flags, data=None):
    def enc(s):
        return s.encode() if s is not None else None

    if libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {src or ''} on {target}: {os.strerror(err)}")


def _read_only(libc, path):
    # Keep the flags the kernel locked (nosuid/nodev/noexec/atime) or a user namespace
    # refuses the remount; add ro, nosuid and nodev.
    f = os.statvfs(path).f_flag
    keep = f & (MS_NOEXEC | MS_NOATIME | MS_NODIRATIME)
    keep |= MS_RELATIME if f & 4096 else 0  # ST_RELATIME
    _mount(libc, None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | keep)


def _submounts(root):
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    points = [p.replace("\\040", " ") for p in points]
    return [p for p in points if p == root or p.startswith(root + "/")]


def isolate(spec, files):
    """Build the new root in this mount namespace and chroot into it."""
    libc = _libc()
    root = spec["root"]
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    _mount(libc, "tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    for path in spec["binds"]:
        target = root + path
        if os.path.islink(path):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.readlink(path), target)
        elif os.path.isdir(path):
            os.makedirs(target, exist_ok=True)
            _mount(libc, path, target, None, MS_BIND | MS_REC)
    for point in sorted(_submounts(root), key=len):
        if point != root:
            _read_only(libc, point)
    os.makedirs(root + "/proc")
    try:
        _mount(libc, "proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:  # some containers refuse a new proc mount: reuse the pid namespace's one
        _mount(libc, "/proc", root + "/proc", None, MS_BIND | MS_REC)
    dev = root + "/dev"
    os.makedirs(dev)
    _mount(libc, "tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,nr_inodes=64,mode=0755")
    for name in _DEVICES:
        open(f"{dev}/{name}", "w").close()
        _mount(libc, f"/dev/{name}", f"{dev}/{name}", None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{name}")
    # One tmpfs holds every writable place, so its size and inode caps bound the whole disk use.
    scratch = root + "/tmp"
    os.makedirs(scratch, exist_ok=True)
    _mount(libc, "tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={spec['disk_bytes']},nr_inodes={spec['max_files']},mode=1777")
    for sub, target in ((".var_tmp", "/var/tmp"), (".shm", "/dev/shm")):
        os.makedirs(f"{scratch}/{sub}", mode=0o1777)
        os.chmod(f"{scratch}/{sub}", 0o1777)
        os.makedirs(root + target, exist_ok=True)
        _mount(libc, f"{scratch}/{sub}", root + target, None, MS_BIND)
    work = root + spec["work"]
    os.makedirs(work, mode=0o700)
    for name, data in files.items():
        path = os.path.join(work, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    if spec["drop_to_nobody"]:
        for dirpath, dirnames, filenames in os.walk(work):
            for n in (*dirnames, *filenames):
                os.chown(os.path.join(dirpath, n), spec["uid"], spec["gid"])
        os.chown(work, spec["uid"], spec["gid"])
    # The new root itself (and the empty mount points on it) becomes read-only too.
    _mount(libc, None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chroot(root)
    os.chdir(spec["work"])


def drop(spec):
    """Give up every privilege before any program code runs."""
    libc = _libc()
    if spec["drop_to_nobody"]:
        os.setgroups([])
        os.setgid(spec["gid"])
        os.setuid(spec["uid"])
    else:
        # Root of our own user namespace: forbid nested user namespaces (a fresh one would
        # allow mounting an uncapped tmpfs), then drop all capabilities for good.
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")
        for cap in range(64):
            libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]

        if libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()) != 0:
            raise OSError(ctypes.get_errno(), "capset failed")
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")


def _audit_hook():
    import socket

    inet = {int(socket.AF_INET), int(socket.AF_INET6)}
    spawn = {"os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen", "pty.spawn"}

    def hook(event, args):
        if event == "socket.__new__" and len(args) > 1 and int(args[1]) in inet:
            raise PermissionError("network access is disabled in the reward sandbox")
        if event in spawn:
            raise PermissionError("starting programs is disabled in the reward sandbox")

    sys.addaudithook(hook)


def _read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def _limit(spec):
    for name, value in spec["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))


def _run_program(spec):
    """Run main.py as ``__main__`` in this process; return its globals."""
    if spec["audit"]:
        _audit_hook()
    program = spec["file"]
    with open(program) as f:
        source = f.read()
    module = types.ModuleType("__main__")
    module.__file__ = program
    module.__builtins__ = __builtins__
    sys.modules["__main__"] = module
    sys.argv = [program]
    sys.path.insert(0, os.getcwd())
    exec(compile(source, program, "exec"), module.__dict__)
    return module.__dict__


def _candidate(spec, req_fd, rep_fd, close_fds):
    """The forked child: the program, then answers to the judge. Never returns."""
    code = 1
    try:
        for fd in close_fds:  # the secret, the verdict and the judge's pipe ends
            os.close(fd)
        _libc().prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # only the judge hides its memory
        _limit(spec)
        program_globals = _run_program(spec)
        serve(req_fd, rep_fd, program_globals)  # noqa: F821 - sandbox_judge.py precedes this file
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the program's own crash, reported like Python would
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _judged(spec):
    """Fork the program off and judge it from this process (see sandbox_judge)."""
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    # Not dumpable before the fork, so the child can never ptrace or read this process's
    # memory and fds; the child turns it back on for itself.
    if _libc().prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _candidate(spec, req_r, rep_w, (spec["secret_fd"], spec["verdict_fd"], req_w, rep_r))
    os.close(req_r)
    os.close(rep_w)
    _limit(spec)
    secret = json.loads(_read_all(spec["secret_fd"]))  # read only here, after the fork
    run_judge(secret["tests"], secret["nonce"], req_w, rep_r, spec["verdict_fd"], pid)  # noqa: F821


def main():
    spec = json.loads(sys.argv[1])
    files = {}
    if spec["isolate"]:
        for dirpath, _, filenames in os.walk("."):
            for n in filenames:
                path = os.path.normpath(os.path.join(dirpath, n))
                with open(path, "rb") as f:
                    files[path] = f.read()
        isolate(spec, files)
        drop(spec)
    del files
    if spec["secret_fd"] is not None:
        _judged(spec)  # never returns
    _limit(spec)
    _run_program(spec)


if __name__ == "__main__":
    main()
