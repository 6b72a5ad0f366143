"""Fuzzing the compiled frame path: coverage-guided, and under the sanitizers.

1. atheris, differential: every input goes through the compiled scan and the pure-Python
   decoder (instrumented, so its branches guide the search), and the two must agree. The
   target builds frames from the fuzz bytes (chosen tags, segment counts, hostile
   lengths, CRCs right or wrong, truncations), so the search reaches the length checks
   and segment reads instead of stopping at the first CRC.
2. AddressSanitizer + UBSan: the extension rebuilt from protocol/_accel.c with
   ``-fsanitize=address,undefined`` runs the hypothesis differential tests. (atheris
   cannot run on top of gcc's ASan runtime: it takes over the coverage hooks, and
   atheris's own runtime is clang's, which a gcc-built module cannot link against.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_TARGET = textwrap.dedent("""
    import struct, sys
    import atheris
    with atheris.instrument_imports():
        from protocol import accel
        from protocol.crc import crc32c
        from protocol.frame_encoder import encode_message_frame_python as encode_message_frame
        from protocol.frames import FrameDecoder, FrameLimits, encode_banner
        from protocol.message import decode_messages_python
    A = accel.ACCEL
    assert A is not None, accel.REASON
    LIM = FrameLimits(segment_max=4096, data_max=8192)
    BANNER = encode_banner(0, 0)
    LENGTHS = [0, 1, 7, 40, 41, 4095, 4096, 4097, 8192, 8193, 1 << 31, 0xFFFFFFFF]

    def reference(stream):
        dec = FrameDecoder(LIM)
        dec.feed(BANNER + stream)
        dec.next_banner()
        before = dec.buffered
        segs = dec.next_message_python()
        return None if segs is None else (before - dec.buffered, [bytes(s) for s in segs])

    def compiled(stream, pad):
        mv = memoryview(bytearray(b"P" * pad + stream))
        r = A.scan_message(mv, pad, len(mv), LIM.segment_max, LIM.data_max)
        return None if r is None else (r[0] - pad, [bytes(s) for s in r[1]])

    def batch(impl, stream, pad):
        mv = memoryview(bytearray(b"P" * pad + stream))
        msgs, ends, ack = impl(mv, pad, len(mv), LIM.segment_max, LIM.data_max, 300, True, 4)
        return [(m.type, m.front, bytes(m.data), m.seq, m.ack_seq, m.raw) for m in msgs], ends, ack

    def length(fdp, small):
        if fdp.ConsumeBool():
            return LENGTHS[fdp.ConsumeIntInRange(0, len(LENGTHS) - 1)]
        return fdp.ConsumeIntInRange(0, small)

    def frame(fdp):
        # a preamble with chosen fields, segments of chosen sizes, CRCs fixed or not
        tag = 17 if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 255)
        nseg = [1, 2, 4, 3, 0, 5][fdp.ConsumeIntInRange(0, 5)]
        l = [length(fdp, 64), length(fdp, 64), 0 if fdp.ConsumeIntInRange(0, 7) else length(fdp, 8),
             length(fdp, 300)]
        pre = struct.pack("<BBIHIHIHIHBB", tag, nseg, l[0], 8, l[1], 8, l[2], 8, l[3], 4096,
                          fdp.ConsumeIntInRange(0, 1), 0)
        out = bytearray(pre + struct.pack("<I", crc32c(pre, 0)))
        fix = fdp.ConsumeIntInRange(0, 3)
        crcs = []
        for i, n in enumerate(l):
            seg = fdp.ConsumeBytes(min(n, 600))
            if i == 0 and n == 41 and fdp.ConsumeBool():  # a header decode_messages takes
                seg = struct.pack("<QQHHHIHQBHH", fdp.ConsumeIntInRange(0, 9), 0,
                                  fdp.ConsumeIntInRange(0x7FF0, 0x8010), 127, 1,
                                  fdp.ConsumeIntInRange(0, 1), 0, 3, 0, 1, 0)
            crcs.append(crc32c(seg, 0xFFFFFFFF))
            out += seg
            if i == 0:
                out += struct.pack("<I", crcs[0] if fix else fdp.ConsumeIntInRange(0, 0xFFFFFFFF))
        late = 0x0E if fix != 1 else fdp.ConsumeIntInRange(0, 255)
        out += struct.pack("<BIII", late, *crcs[1:]) if fix != 2 else fdp.ConsumeBytes(13)
        if fdp.ConsumeBool():
            del out[fdp.ConsumeIntInRange(0, len(out)):]  # truncated
        return bytes(out)

    def one(data):
        fdp = atheris.FuzzedDataProvider(data)
        pad = fdp.ConsumeIntInRange(0, 8)
        stream = frame(fdp)
        if fdp.ConsumeBool():
            stream += frame(fdp)
        assert compiled(stream, pad) == reference(stream), stream.hex()
        assert batch(A.decode_messages, stream, pad) == batch(decode_messages_python, stream, pad)
        h, f, d = (fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 5000)) for _ in range(3))
        assert ([bytes(x) for x in A.encode_message_frame(h, f, d)]
                == [bytes(x) for x in encode_message_frame(h, f, d)])

    atheris.Setup([sys.argv[0], "-runs=" + sys.argv[1], "-max_len=4096", "-seed=7"], one)
    atheris.Fuzz()
""")

#: drives the sanitized build over hostile input; the sanitizers are the oracle here
#: (agreement with Python is test_accel.py's and the atheris target's job)
_UNDER_ASAN = textwrap.dedent("""
    import importlib.util, itertools, os, struct, sys
    spec = importlib.util.spec_from_file_location("_accel", sys.argv[1])
    A = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(A)
    import msgpack
    from protocol.crc import crc32c
    from protocol.frame_encoder import encode_message_frame_python as encode_message_frame
    from protocol.message import HEADER, Message
    A.setup_decode(Message, msgpack.unpackb, (ValueError, TypeError, RecursionError,
                                              OverflowError, msgpack.exceptions.UnpackException))
    LENGTHS = [0, 1, 7, 40, 41, 4095, 4096, 4097, 65536, 65537, 1 << 31, 0xFFFFFFFF]
    SEG, DATA = 65536, 1 << 20
    scans = 0

    def scan(stream):
        # an exact-size malloc block per stream (PYTHONMALLOC=malloc): one byte past it is
        # caught; scan both from 0 and from an offset, as in a used receive buffer
        global scans
        for pad in (0, 3):
            mv = memoryview(bytearray(b"P" * pad + stream))
            A.scan_message(mv, pad, len(mv), SEG, DATA)
            A.decode_messages(mv, pad, len(mv), SEG, DATA, 200, True, 4)
            scans += 1

    frames = [b"".join(bytes(x) for x in encode_message_frame(os.urandom(h), os.urandom(f),
                                                              os.urandom(d)))
              for h, f, d in itertools.product((1, 41), (0, 9, 300), (0, 5, 4096, 5000))]
    # headers decode_messages takes (asyncmsgr and Ceph types), fronts valid msgpack or not
    for t, front in itertools.product((1, 0x8001), (b"", b"\\x93\\x01\\xa1x\\xc0", b"\\xc1", os.urandom(300))):
        hdr = HEADER.pack(5, 6, t, 127, 1, 0, 0, 4, 0, 1, 0)
        frames.append(b"".join(bytes(x) for x in encode_message_frame(hdr, front, b"d" * 9)))
    for fr in frames:  # every truncation, and every single-bit flip of the preamble/epilogue
        for cut in range(len(fr) + 1):
            scan(fr[:cut])
        for bit in itertools.chain(range(0, 32 * 8), range((len(fr) - 13) * 8, len(fr) * 8)):
            b = bytearray(fr)
            b[bit // 8] ^= 1 << (bit % 8)
            scan(bytes(b))
    for tag, nseg, l0, l1, l3 in itertools.product((17, 3), (1, 2, 4, 3), LENGTHS, LENGTHS,
                                                   LENGTHS):
        pre = struct.pack("<BBIHIHIHIHBB", tag, nseg, l0, 8, l1, 8, 0, 8, l3, 4096, 0, 0)
        head = pre + struct.pack("<I", crc32c(pre, 0))
        for body in (b"", os.urandom(50)):
            scan(head + body)
    for h, f, d in itertools.product((0, 1, 41), (0, 1, 300), (0, 1, 4096, 4097, 70000)):
        A.encode_message_frame(os.urandom(h), bytearray(os.urandom(f)),
                               memoryview(os.urandom(d)))
        A.encode_message(1 << 63, 2, 3, 4, 5, 6, 7, 8, os.urandom(f), os.urandom(d))
        batch = []
        for raw, t in ((True, 0xFFFF), (False, 0x7FFF), (False, 0x8000), (True, -1)):
            m = Message(t, os.urandom(f) if raw else f, memoryview(os.urandom(d)), raw=raw,
                        seq=1 << 63, ack_seq=(1 << 64) - 1)
            if t >= 0 and (raw or t <= 0x7FFF):
                m.encoded_front()
            batch.append(m)
        A.setup_encode(msgpack.packb, lambda m, peer: None)
        for m in batch + [Message(1, {1, 2}), Message(True, None), Message(1, b"x", raw=True)]:
            A.check_outgoing(m)
            A.check_outgoing(m, ceph_peer=True)
        out = []
        A.encode_batch(batch, 0, True, out)
        A.encode_batch(batch, 3, False, out)
    for n in range(0, 70):
        A.crc32c(os.urandom(n)[1:], 0xFFFFFFFF)
    print("scans", scans)
""")


def _asan_runtime() -> str | None:
    cc = shutil.which("gcc")
    if cc is None:
        return None
    path = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True,
                          text=True, check=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def test_atheris_differential_fuzz_of_the_compiled_path(tmp_path: Path) -> None:
    try:
        import atheris  # noqa: F401
    except ImportError:
        pytest.skip("atheris is not installed (pip install atheris; x86-64 wheels exist)")
    from protocol import accel
    if accel.ACCEL is None:
        pytest.skip(f"no compiled path: {accel.REASON}")
    script = tmp_path / "fuzz_accel.py"
    script.write_text(_TARGET)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("ASYNCMSGR_NO_EXTENSIONS", None)
    r = subprocess.run([sys.executable, str(script), "20000"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Done 20000 runs" in r.stderr


def test_the_compiled_path_under_asan_and_ubsan(tmp_path: Path) -> None:
    """Every truncation and preamble/epilogue bit flip of valid frames, every hostile
    length combination, the encoders and CRC at odd sizes and alignments, with the
    extension built with AddressSanitizer and UBSan. PYTHONMALLOC=malloc makes every
    buffer a malloc block of its own, so a read one byte past a frame is caught."""
    libasan = _asan_runtime()
    if libasan is None:
        pytest.skip("no gcc with AddressSanitizer here (Debian: gcc)")
    so = tmp_path / "_accel.so"
    inc = sysconfig.get_paths()["include"]
    subprocess.run(["gcc", "-O1", "-g", "-fno-omit-frame-pointer", "-shared", "-fPIC",
                    "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                    f"-I{inc}", *map(str, sorted((ROOT / "protocol").glob("_accel*.c"))),
                    "-o", str(so)],
                   check=True, timeout=120)
    script = tmp_path / "under_asan.py"
    script.write_text(_UNDER_ASAN)
    env = dict(os.environ, PYTHONPATH=str(ROOT), LD_PRELOAD=libasan, PYTHONMALLOC="malloc",
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    r = subprocess.run([sys.executable, str(script), str(so)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=100, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert int(r.stdout.split()[-1]) > 20_000  # it really ran them
