"""Record the Triton kernel launches made under the interpreter; compile them for a GPU target.

The Triton interpreter (TRITON_INTERPRET=1, used by every CPU test) accepts code that the
real compiler refuses (dtype mismatches in `tl.where`, `tl.dot` shape and dtype rules,
non-constexpr shapes, ...). Triton can compile to a cubin without a GPU, but
`triton.compile` needs each kernel's signature, and hand-writing them goes stale as kernels
change. So:

1. `LaunchRecorder` (in a process with the interpreter on) wraps
   `InterpretedFunction.run`, the path every `kernel[grid](...)` launch takes, and records
   each launch as the real JIT would specialize it: the kernel's module and qualified name,
   each argument's Triton type (`*bf16`, `i32`, `i64`, `fp32`, `u1`, ...), the values of the
   constexprs (including ints equal to 1 and None, which the JIT turns into constexprs),
   the divisibility-by-16 attributes and launch options such as `num_warps`. It also notes
   which `@triton.jit` device functions each kernel called, so that a module holding only
   device functions is known to be covered. Launches are deduplicated.
2. `compile_launches` (in a process with TRITON_INTERPRET=0, see `compile_in_subprocesses`)
   compiles every recorded launch with `triton.compile(ASTSource(...), target=...)`.

The specialization reuses Triton's own binder (`create_function_from_signature`), the code
`JITFunction.run` uses to build its cache key, so the signature, constexprs and attributes
are the ones a GPU launch with the same Python arguments would compile.

Run as a script (what `compile_in_subprocesses` does):
    TRITON_INTERPRET=0 python tests/triton_capture.py LAUNCHES.json RESULTS.json ARCH

The same script checks the kernels against ANOTHER Triton (e.g. the GPU image's, older than
the one torch pins here): record with this environment, compile with the other one, in
which alignfuse is installed (`pip install --no-deps --no-build-isolation .`):
    pytest -p no:cacheprovider --basetemp /tmp/sm90 tests/test_triton_sm90.py
    TRITON_INTERPRET=0 OTHER/python tests/triton_capture.py \
        /tmp/sm90/sm900/launches.json /tmp/other.json 90
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

@dataclass
class Launch:
    """One distinct specialization of one kernel, as `triton.compile` needs it."""

    module: str                          # e.g. "alignfuse.kernels.policy.triton_kl"
    qualname: str                        # e.g. "_kl_penalty_kernel"
    signature: dict[str, str]            # every parameter -> "*bf16", "i32", ..., "constexpr"
    constexprs: dict[str, Any]           # JSON-encoded values (see `_encode_constexpr`)
    attrs: dict[str, str]                # parameter -> "D" (divisible by 16)
    options: dict[str, Any]              # launch options: num_warps, num_stages, ...
    device_functions: list[str] = field(default_factory=list)  # "module:qualname" called
    labels: list[str] = field(default_factory=list)  # which op variants launched it

    @property
    def name(self) -> str:
        return f"{self.module}:{self.qualname}"

    def key(self) -> str:
        """What makes two launches compile differently (labels and callees excluded)."""
        return json.dumps([self.module, self.qualname, self.signature, self.constexprs,
                           self.attrs, self.options], sort_keys=True)

    def describe(self) -> str:
        consts = ", ".join(f"{k}={v!r}" for k, v in self.constexprs.items())
        types = ", ".join(f"{k}:{v}" for k, v in self.signature.items() if v != "constexpr")
        opts = "".join(f", {k}={v}" for k, v in self.options.items())
        return f"{self.qualname}[{consts}{opts}]({types})"


def _encode_constexpr(value: Any) -> Any:
    """A constexpr value as JSON: plain scalars as they are, dtypes and jit functions tagged."""
    import triton.language as tl

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tl.dtype):
        return {"dtype": value.name}
    fn = getattr(value, "fn", None)
    if fn is not None and inspect.isfunction(fn):  # a @triton.jit function passed as constexpr
        return {"jit": f"{fn.__module__}:{fn.__qualname__}"}
    raise TypeError(f"cannot record constexpr value {value!r} of type {type(value).__name__}; "
                    "teach tests/triton_capture.py to encode it")


def _decode_constexpr(value: Any) -> Any:
    import triton.language as tl

    if isinstance(value, dict) and "dtype" in value:
        return tl.str_to_ty(value["dtype"], None)
    if isinstance(value, dict) and "jit" in value:
        return _load_function(value["jit"])
    return value


def _load_function(name: str):
    module, qualname = name.split(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


class LaunchRecorder:
    """Context manager: while active, every interpreted kernel launch is recorded.

        recorder = LaunchRecorder()
        with recorder, recorder.labelled("dpo_loss[ipo]"):
            dpo_loss(...).sum().backward()
        recorder.launches  # distinct Launch objects, first-seen order

    Needs the interpreter (TRITON_INTERPRET=1 before triton was imported). The kernels still
    run, so the op's later launches (the backward) see real forward outputs.
    """

    def __init__(self) -> None:
        self._by_key: dict[str, Launch] = {}
        self._binders: dict[Any, Any] = {}
        self._label = "unlabelled"
        self._active: Launch | None = None
        self._restore: list[tuple[Any, str, Any]] = []

    @property
    def launches(self) -> list[Launch]:
        return list(self._by_key.values())

    @contextlib.contextmanager
    def labelled(self, label: str) -> Iterator[None]:
        previous, self._label = self._label, label
        try:
            yield
        finally:
            self._label = previous

    def __enter__(self) -> "LaunchRecorder":
        from triton.runtime.interpreter import InterpretedFunction

        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError("LaunchRecorder needs the Triton interpreter: set "
                               "TRITON_INTERPRET=1 before triton is imported")
        recorder = self
        real_run, real_call = InterpretedFunction.run, InterpretedFunction.__call__

        def run(fn_self, *args, grid, warmup, **kwargs):
            launch = recorder._record(fn_self, args, kwargs)
            outer, recorder._active = recorder._active, launch
            try:
                return real_run(fn_self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                recorder._active = outer

        def call(fn_self, *args, **kwargs):  # a device function called from a kernel
            if recorder._active is not None:
                name = f"{fn_self.fn.__module__}:{fn_self.fn.__qualname__}"
                if name not in recorder._active.device_functions:
                    recorder._active.device_functions.append(name)
            return real_call(fn_self, *args, **kwargs)

        self._restore = [(InterpretedFunction, "run", real_run),
                         (InterpretedFunction, "__call__", real_call)]
        InterpretedFunction.run = run
        InterpretedFunction.__call__ = call
        return self

    def __exit__(self, *exc) -> None:
        for owner, attr, value in self._restore:
            setattr(owner, attr, value)
        self._restore = []

    def _binder(self, interpreted):
        """Triton's own argument binder for this kernel: (bound args, specialization, options)."""
        fn = interpreted.fn
        if fn not in self._binders:
            from triton.backends.compiler import BaseBackend
            from triton.runtime.jit import KernelParam, create_function_from_signature

            no_spec = interpreted.kwargs.get("do_not_specialize") or []
            no_align = interpreted.kwargs.get("do_not_specialize_on_alignment") or []
            signature = inspect.signature(fn)
            params = [KernelParam(i, p, i in no_spec or p.name in no_spec,
                                  i in no_align or p.name in no_align)
                      for i, p in enumerate(signature.parameters.values())]
            # The CUDA backend inherits BaseBackend's specialization (divisibility by 16).
            self._binders[fn] = create_function_from_signature(signature, params, BaseBackend)
        return self._binders[fn]

    def _record(self, interpreted, args, kwargs) -> Launch:
        fn = interpreted.fn
        bound, specialization, options = self._binder(interpreted)(*args, **kwargs)
        signature, constexprs, attrs = {}, {}, {}
        for (name, value), spec in zip(bound.items(), specialization):
            kind, extra = spec[0], spec[1] if len(spec) > 1 else None
            if not isinstance(kind, str):
                raise NotImplementedError(f"{fn.__qualname__}: tuple argument {name!r} is not "
                                          "supported by tests/triton_capture.py yet")
            signature[name] = kind
            if kind == "constexpr":
                constexprs[name] = _encode_constexpr(value)
            elif isinstance(extra, str) and extra:
                attrs[name] = extra
        launch = Launch(fn.__module__, fn.__qualname__, signature, constexprs, attrs,
                        {k: v for k, v in sorted(options.items())})
        launch = self._by_key.setdefault(launch.key(), launch)
        if self._label not in launch.labels:
            launch.labels.append(self._label)
        return launch


# ---------------------------------------------------------------------------------------
# Compilation (TRITON_INTERPRET=0).


def compile_launches(launches: list[dict], arch: int) -> list[dict]:
    """Compile each launch (as `Launch.__dict__`) for `GPUTarget("cuda", arch, 32)`.

    Returns, per launch, {"ok": bool, "seconds": float, "error": str}. "ok" means the
    compiled kernel carries a cubin.
    """
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    target = GPUTarget("cuda", arch, 32)
    results = []
    for launch in launches:
        start = time.perf_counter()
        try:
            fn = _load_function(f"{launch['module']}:{launch['qualname']}")
            if not isinstance(fn, JITFunction):
                raise RuntimeError(f"{launch['qualname']} is a {type(fn).__name__}, not a "
                                   "JITFunction: is TRITON_INTERPRET set in this process?")
            names = fn.arg_names
            constexprs = {k: _decode_constexpr(v) for k, v in launch["constexprs"].items()}
            attrs = {(names.index(k),): BaseBackend.parse_attr(v)
                     for k, v in launch["attrs"].items()}
            source = ASTSource(fn, launch["signature"], constexprs, attrs)
            compiled = triton.compile(source, target=target, options=launch["options"])
            ok = bool(compiled.asm.get("cubin"))
            error = "" if ok else f"no cubin among {sorted(compiled.asm)}"
        except Exception as exc:  # the whole message is the report
            ok, error = False, f"{type(exc).__name__}: {exc}"
        results.append({"ok": ok, "seconds": time.perf_counter() - start, "error": error})
    return results


def compile_in_subprocesses(launches: list[Launch], workdir: str, *, arch: int = 90,
                            processes: int = 2, timeout: float = 600) -> list[dict]:
    """Compile `launches` in `processes` fresh interpreters with TRITON_INTERPRET=0.

    Launches are dealt round-robin so the slow (tl.dot) kernels spread over the workers.
    Returns one result per launch, in order (see `compile_launches`).
    """
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    chunks = [list(range(i, len(launches), processes)) for i in range(processes)]
    chunks = [c for c in chunks if c]
    workers = []
    for n, chunk in enumerate(chunks):
        src = os.path.join(workdir, f"launches{n}.json")
        dst = os.path.join(workdir, f"results{n}.json")
        with open(src, "w") as f:
            json.dump([launches[i].__dict__ for i in chunk], f, indent=1)
        proc = subprocess.Popen([sys.executable, __file__, src, dst, str(arch)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        workers.append((chunk, dst, proc))
    results: list[dict | None] = [None] * len(launches)
    for chunk, dst, proc in workers:
        output, _ = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"compile worker exited with {proc.returncode}:\n{output[-4000:]}")
        with open(dst) as f:
            for i, result in zip(chunk, json.load(f)):
                results[i] = result
    return results  # type: ignore[return-value]


if __name__ == "__main__":
    launches_path, results_path, arch_arg = sys.argv[1:4]
    with open(launches_path) as f:
        todo = json.load(f)
    done = compile_launches(todo, int(arch_arg))
    with open(results_path, "w") as f:
        json.dump(done, f, indent=1)
