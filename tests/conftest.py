import os

# Tests run on the CPU with 8 virtual devices (multi-device tests need them; others ignore them).
# Appended, so that XLA flags already set (dumps, other options) still apply.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The suite is compile-bound: XLA:CPU's LLVM backend at -O0 without its expensive passes compiles a third
# faster (tests/test_parity.py: 97 -> 65 CPU seconds), and its elemental emitters instead of the fusion
# emitters halve the rest (a tiny model's generate: 15.7 -> 8.6 s of backend compile); the tests' small
# programs run about as fast. Numerics are unchanged in kind (no fast-math either way); every parity
# tolerance holds as written.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "--xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# One persistent XLA cache for the run, in a fresh directory removed at exit: the suite compiles the same
# programs in many modules (their in-memory caches are dropped, below) and in every CLI subprocess it
# starts (which inherit these variables). What a test traces and checks is unchanged; only XLA's
# compile of an already-seen program is skipped.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="zaya-jax-test-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A tiny random HF checkpoint (transformers' save_pretrained), built once per module."""
    import hf_ref

    path = tmp_path_factory.mktemp("pristine") / "hf"
    hf_ref.build("tiny", path, seed=2)
    return path


@pytest.fixture
def src(pristine, tmp_path):
    """A fresh copy of the tiny checkpoint to damage."""
    return shutil.copytree(pristine, tmp_path / "src")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops each module's compiled programs once it is done: one process runs the whole suite, and the
    hundreds of executables it would otherwise keep hold memory that later compiles need."""
    yield
    jax.clear_caches()
