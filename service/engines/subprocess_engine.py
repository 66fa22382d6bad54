"""Any engine, run in a child process: the event loop and the decoder stop sharing one GIL.

In one process, the decoding thread gives up the GIL around every torch kernel (about 1,200 per
small batch) and must take it back from the event loop, which holds it for the Python work of
each request (parsing, validation, the response: about 1.5 ms of CPU on 2 cores). Measured with
the torch engine on the Yelp bundle, 1 torch thread: a batch of 3 users decodes in about 19 ms
alone and in about 23 ms inside the serving process at 100 requests/s.

The child builds the engine from its registered name and keyword arguments, and keeps its own
copy of the item trie: the parent ships the trie's bytes (`ItemTrie.to_bytes`) with a batch
whenever the trie object or its version changed since the last one shipped (after /tokenize or
a Redis resync), so a batch is always decoded against the trie of the moment it was sent, as in
process. Requests and results cross a pipe (a few KB a batch). An exception in the child is
raised again in the parent with its type; a child that dies is started again at once (a thread
waits on its exit), and one that hangs is replaced too: a batch not answered within
`batch_timeout_s` kills the child instead of blocking decoding for good. A batch whose child died or hung under it is decoded once more
on the new child (decoding has no side effects and the parent holds the trie), so a lost child
costs its batch latency, not an error; a second loss in a row fails the batch.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import queue
import signal
import threading
import time
from collections.abc import Sequence
from multiprocessing import connection as mp_connection
from multiprocessing.connection import Connection
from typing import Any

from models.trie import ItemTrie
from service.engines.base import DecodeEngine, DecodeRequest, Recommendation

log = logging.getLogger(__name__)


class DecodeWorkerError(RuntimeError):
    """The child process failed to start, died, or raised an exception that does not pickle."""


class DecodeWorkerLost(DecodeWorkerError):
    """The child died or hung while decoding a batch (it was killed and will be replaced)."""


def _worker(conn: Connection, engine_name: str, kwargs: dict[str, Any], threads: int) -> None:
    """Child process main: build the engine, then serve (op, trie bytes | None, payload)."""
    # Ctrl+C in a terminal reaches the whole process group: the parent shuts down gracefully
    # and finishes queued batches, so the child must outlive the signal and wait for "close".
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        from service.engines import load_engine_class

        engine = load_engine_class(engine_name)(**kwargs)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", _portable(e)))
        return
    conn.send(("ready", engine.name))
    trie: ItemTrie | None = None
    while True:
        try:
            op, blob, payload = conn.recv()
        except (EOFError, OSError):
            break
        if op == "close":
            break
        try:
            if blob is not None:
                trie = ItemTrie.from_bytes(blob)
            if trie is None:
                raise DecodeWorkerError("no trie shipped to the decode worker")
            if op == "warmup":
                engine.warmup(trie)
                conn.send(("ok", None))
            else:
                conn.send(("ok", engine.recommend(payload, trie)))
        except Exception as e:  # noqa: BLE001 - the parent raises it for this batch only
            conn.send(("error", _portable(e)))
    engine.close()


def _portable(e: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else a DecodeWorkerError naming it."""
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return DecodeWorkerError(f"{type(e).__name__}: {e}")


class SubprocessEngine(DecodeEngine):
    """`engine_name`'s engine (service.engines registry) in a spawned child process."""

    def __init__(
        self,
        engine_name: str,
        threads: int = 0,
        start_timeout_s: float = 600.0,
        batch_timeout_s: float = 120.0,
        **kwargs: Any,
    ) -> None:
        self.engine_name = engine_name
        self.threads = threads
        self.start_timeout_s = start_timeout_s
        self.batch_timeout_s = batch_timeout_s
        self.kwargs = kwargs
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._proc: Any = None
        self._shipped: tuple[int, ...] | None = None
        self._closed = False
        self.name = engine_name
        self._start()

    # ---- process lifecycle ---------------------------------------------------------------
    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # fork would copy the parent's threads and torch state
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_worker,
            args=(child, self.engine_name, self.kwargs, self.threads),
            name=f"letterrec-decode-{self.engine_name}",
            daemon=True,
        )
        t0 = time.perf_counter()
        proc.start()
        child.close()
        if not parent.poll(self.start_timeout_s):
            proc.kill()
            raise DecodeWorkerError(
                f"decode worker ({self.engine_name}) not ready after {self.start_timeout_s:.0f} s"
            )
        try:
            status, value = parent.recv()
        except EOFError:
            proc.join(5)
            raise DecodeWorkerError(
                f"decode worker ({self.engine_name}) exited while starting, code {proc.exitcode}"
            ) from None
        if status != "ready":
            proc.join(5)
            raise value
        self._conn, self._proc, self._shipped = parent, proc, None
        self.name = str(value)
        threading.Thread(
            target=self._watch, args=(proc,), name=f"watch-decode-{proc.pid}", daemon=True
        ).start()
        log.info(
            "decode worker pid %d (%s engine) ready in %.1f s",
            proc.pid,
            self.name,
            time.perf_counter() - t0,
        )

    def _watch(self, proc: Any) -> None:
        """Start a new child as soon as `proc` exits unexpectedly, so the next batch does not
        wait for a start-up (a child lost during a batch is replaced by that batch's retry)."""
        mp_connection.wait([proc.sentinel])
        with self._lock:
            if self._closed or self._proc is not proc:
                return  # closed, or already replaced
            log.error(
                "decode worker pid %d exited (code %s); starting a new one",
                proc.pid,
                proc.exitcode,
            )
            self._discard()
            try:
                self._start()
            except Exception:  # noqa: BLE001 - the next batch tries again and reports it
                log.exception("could not start a new decode worker; the next batch will retry")

    def _kill_hung(self) -> None:
        """Kill a child that stopped answering (SIGKILL works on a stopped process too)."""
        log.error(
            "decode worker pid %s hung for %.0f s; killing it", self.pid, self.batch_timeout_s
        )
        self._discard()

    def _discard(self) -> None:
        """Kill the child (if it still runs) and drop its pipe; the next call starts a new one."""
        self._shipped = None
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(5)
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def _alive(self) -> bool:
        return self._conn is not None and self._proc is not None and self._proc.is_alive()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._conn.send(("close", None, None))
            if self._proc is not None:
                self._proc.join(10)
                if self._proc.is_alive():
                    self._proc.kill()
                    self._proc.join(5)
            if self._conn is not None:
                self._conn.close()
            self._conn = self._proc = None

    # ---- calls -----------------------------------------------------------------------------
    def _call(self, op: str, trie: ItemTrie, payload: Any) -> Any:
        with self._lock:
            try:
                return self._call_once(op, trie, payload)
            except DecodeWorkerLost as e:
                log.warning("%s; decoding the batch again on a new worker", e)
                return self._call_once(op, trie, payload)

    def _call_once(self, op: str, trie: ItemTrie, payload: Any) -> Any:
        key = (id(trie), trie.version, len(trie), trie.n_active)
        if not self._alive():
            code = None if self._proc is None else self._proc.exitcode
            log.error("decode worker is gone (exit code %s); starting a new one", code)
            self._start()
        assert self._conn is not None
        blob = None if key == self._shipped else trie.to_bytes()
        try:
            self._conn.send((op, blob, payload))
            if not self._conn.poll(self.batch_timeout_s):
                self._kill_hung()
                raise DecodeWorkerLost(
                    f"decode worker gave no answer within {self.batch_timeout_s:g} s (hung);"
                    " it was killed"
                )
            status, value = self._conn.recv()
        except (EOFError, OSError) as e:
            # Its pipe can close before its exit is visible: reap it, so the retry starts anew.
            self._discard()
            code = self._proc.exitcode if self._proc is not None else None
            raise DecodeWorkerLost(f"decode worker died during a batch (exit code {code})") from e
        if status != "ok":
            self._shipped = None  # the child may not hold this trie: ship it again
            raise value
        self._shipped = key
        return value

    def recommend(
        self, requests: Sequence[DecodeRequest], trie: ItemTrie
    ) -> list[list[Recommendation]]:
        return self._call("recommend", trie, list(requests))

    def warmup(self, trie: ItemTrie) -> None:
        self._call("warmup", trie, None)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid


class DecodePool(DecodeEngine):
    """`workers` child decode processes (each a `SubprocessEngine`); a batch goes to whichever
    is idle, so up to `workers` batches decode at once, one per core.

    On a small CPU one child with every core's threads scales poorly at serving batch sizes
    (a batch of 16-32 users gives each GEMM too little work to split); children with one thread
    each decode separate batches side by side. Each child keeps its own copy of the trie, shipped
    when it changes, so a batch decodes against the trie of the moment it was sent, whichever
    child takes it. A child that dies or hangs is replaced as in `SubprocessEngine`.
    """

    def __init__(self, engine_name: str, workers: int, **kwargs: Any) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._workers: list[SubprocessEngine] = []
        try:
            for _ in range(workers):
                self._workers.append(SubprocessEngine(engine_name, **kwargs))
        except BaseException:
            self.close()
            raise
        self.name = self._workers[0].name
        self.threads = self._workers[0].threads
        # Last in, first out: at low load one child takes every batch while its weights and
        # trie are hot in cache; the others join only when batches overlap.
        self._idle: queue.LifoQueue[SubprocessEngine] = queue.LifoQueue()
        for w in reversed(self._workers):
            self._idle.put(w)

    def recommend(
        self, requests: Sequence[DecodeRequest], trie: ItemTrie
    ) -> list[list[Recommendation]]:
        worker = self._idle.get()
        try:
            return worker.recommend(requests, trie)
        finally:
            self._idle.put(worker)

    def warmup(self, trie: ItemTrie) -> None:
        for w in self._workers:
            w.warmup(trie)

    def close(self) -> None:
        for w in self._workers:
            w.close()

    @property
    def workers(self) -> int:
        return len(self._workers)

    @property
    def pids(self) -> list[int | None]:
        return [w.pid for w in self._workers]
