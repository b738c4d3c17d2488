# Switchyard sandbox loader (Python). Runs as the init process of a gVisor sandbox.
#
# Protocol on stdin:  "<N>\n" followed by N bytes of UTF-8 JSON:
#   {"argv":  ["python3", "main.py", "arg1"],      # required
#    "files": {"main.py": "print(1)",              # text files, written under cwd
#              "data.bin": {"base64": "AAEC"}},    # binary files
#    "cwd":   "/tmp/work",                          # optional (default /tmp/work)
#    "exec":  false}                                # optional: force execve even for python3
# Every byte after the payload is left unread and becomes the program's stdin.
#
# If SWITCHYARD_READY is set in the environment, the loader first writes "\0READY\n" to stderr
# so a warm pool knows the sandbox is up. The variable is removed before user code runs.
#
# A payload whose argv is ["python3"|"python", SCRIPT, ...] runs SCRIPT in this interpreter
# (no second interpreter start-up); any other argv is execve'd with a clean environment.
# Loader errors exit with status 125.
import os
import sys

ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}


def _fail(msg):
    os.write(2, b"switchyard loader: " + msg.encode() + b"\n")
    os._exit(125)


def _read_exact(n):
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(0, n - len(buf))
        if not chunk:
            _fail("unexpected EOF in payload")
        buf += chunk
    return bytes(buf)


def _load():
    import json
    if os.environ.pop("SWITCHYARD_READY", None):
        os.write(2, b"\0READY\n")
    header = bytearray()
    while True:
        c = os.read(0, 1)  # byte by byte: never read past the payload
        if not c:
            _fail("EOF before payload header")
        if c == b"\n":
            break
        header += c
        if len(header) > 10:
            _fail("payload header too long")
    try:
        payload = json.loads(_read_exact(int(header)))
        argv = [str(a) for a in payload["argv"]]
    except Exception as e:  # noqa: BLE001
        _fail("bad payload: %r" % (e,))
    if not argv:
        _fail("empty argv")
    cwd = payload.get("cwd") or "/tmp/work"
    os.makedirs(cwd, exist_ok=True)
    for name, content in (payload.get("files") or {}).items():
        path = os.path.normpath(os.path.join(cwd, name))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if isinstance(content, dict):
            import base64
            data = base64.b64decode(content["base64"])
        else:
            data = str(content).encode()
        with open(path, "wb") as f:
            f.write(data)
    os.chdir(cwd)
    return argv, bool(payload.get("exec"))


def _main():
    argv, force_exec = _load()
    inproc = (not force_exec and len(argv) >= 2 and argv[0] in ("python3", "python", sys.executable)
              and not argv[1].startswith("-"))
    if not inproc:
        prog = argv[0] if "/" in argv[0] else "/usr/bin/" + argv[0]
        try:
            os.execve(prog, argv, ENV)
        except OSError as e:
            _fail("exec %s: %s" % (prog, e))
    os.environ.clear()
    os.environ.update(ENV)
    script = os.path.abspath(argv[1])
    sys.argv = argv[1:]
    sys.path[0] = os.path.dirname(script)
    import runpy
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit:
        raise
    except BaseException as e:  # report like CPython would, without the loader's frames
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != script:
            tb = tb.tb_next
        if tb is not None:
            e.__traceback__ = tb  # the default hook prints e.__traceback__, not its argument
        sys.excepthook(type(e), e, e.__traceback__)
        sys.exit(1)


_main()
