"""Contract of a :class:`flexgen.storage.base.StorageBackend`.

What the engine relies on: ``put`` keeps a copy and ``get`` returns it (dtype and shape as
given, for float and byte tensors alike); ``empty`` gives a zero-filled tensor that the engine
writes in place, directly or by slices through ``write``, and later reads back through ``get``
and ``fetch``; ``free`` forgets a key; ``nbytes`` counts what the tier holds (the memory
statistics and the policy's budgets are built on it); ``release`` is a hint that never changes
a tensor's values; keys contain slashes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flexgen.storage.base import StorageBackend
from flexgen.testing._random import fresh_generator, randn

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.uint8]
SHAPES = [(3, 5, 7), (64,), (1, 1)]


def _random(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    return randn(shape, gen, dtype)


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, on any devices."""
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and torch.equal(a.cpu(), b.cpu())


class StorageBackendContract:
    """Subclass as ``Test...`` and implement :meth:`make_storage` (or override ``storage``).

    Attributes a subclass may change:
        compute_device: the device passed to the backend and used for ``fetch``.
        nbytes_exact: ``nbytes()`` grows by exactly the bytes of each tensor held; set False
            for a backend that stores tensors in another form (then it only has to grow and
            shrink back).
    """

    compute_device: str = "cpu"
    nbytes_exact: bool = True

    def make_storage(self, tmp_path: Path) -> StorageBackend:
        """The backend under test, with ``offload_dir`` under ``tmp_path``."""
        raise NotImplementedError("subclass StorageBackendContract and implement make_storage(tmp_path)")

    @pytest.fixture
    def storage(self, tmp_path: Path):
        backend = self.make_storage(tmp_path)
        yield backend
        backend.close()

    # -- put / get ----------------------------------------------------------------------------

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    def test_put_get_roundtrip(self, storage: StorageBackend, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        gen, seed = fresh_generator()
        x = _random(shape, dtype, gen)
        resident = storage.put("weights/t/layers.0.w", x)
        assert _same(resident, x), f"put returned a different tensor (seed {seed})"
        got = storage.get("weights/t/layers.0.w")
        assert got is not None, "get returned None for a key just put"
        assert _same(got, x), f"get returned a different tensor (seed {seed})"

    def test_put_keeps_a_copy(self, storage: StorageBackend) -> None:
        """Changing the caller's tensor after put must not change what is stored."""
        x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
        storage.put("a/b", x)
        x.fill_(-1)
        assert torch.equal(storage.get("a/b").cpu(), torch.arange(12, dtype=torch.float32).reshape(3, 4))

    def test_put_non_contiguous(self, storage: StorageBackend) -> None:
        gen, seed = fresh_generator()
        x = randn((6, 10), gen).t()[1:]
        storage.put("nc", x)
        assert _same(storage.get("nc"), x.contiguous()), f"seed {seed}"

    @pytest.mark.parametrize("column_major", [False, True], ids=["row-major", "column-major"])
    def test_adopt_keeps_the_values(self, storage: StorageBackend, column_major: bool) -> None:
        """``adopt`` (the caller gives its tensor up) holds the same values as ``put`` would."""
        gen, seed = fresh_generator()
        x = randn((5, 7), gen)
        given = x.t().contiguous().t() if column_major else x.clone()
        resident = storage.adopt("weights/a/layers.0.w", given)
        assert _same(resident, x), f"adopt returned a different tensor (seed {seed})"
        assert _same(storage.get("weights/a/layers.0.w"), x), f"get after adopt differs (seed {seed})"

    def test_put_overwrites(self, storage: StorageBackend) -> None:
        storage.put("k", torch.zeros(4))
        storage.put("k", torch.ones(4))
        assert torch.equal(storage.get("k").cpu(), torch.ones(4))

    def test_get_missing_is_none(self, storage: StorageBackend) -> None:
        assert storage.get("no/such/key") is None

    def test_keys_with_slashes_are_distinct(self, storage: StorageBackend) -> None:
        keys = ["weights/abc/layers.0.fc1.weight", "weights/abc/layers.0.fc1.bias", "cache/run/3/1/k.data"]
        for i, key in enumerate(keys):
            storage.put(key, torch.full((2,), float(i)))
        for i, key in enumerate(keys):
            assert torch.equal(storage.get(key).cpu(), torch.full((2,), float(i))), key

    # -- empty / in-place writes -------------------------------------------------------------

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_empty_is_zero_filled(self, storage: StorageBackend, dtype: torch.dtype) -> None:
        resident = storage.empty("cache/r/0/0/k", (4, 3, 5), dtype)
        assert resident.dtype == dtype and tuple(resident.shape) == (4, 3, 5)
        assert not resident.cpu().any()

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_in_place_writes_are_seen_by_get(self, storage: StorageBackend, dtype: torch.dtype) -> None:
        """The engine writes a token's keys/values into a slice and reads the prefix back."""
        gen, seed = fresh_generator()
        resident = storage.empty("cache/r/0/0/v", (6, 2, 8), dtype)
        expected = torch.zeros(6, 2, 8, dtype=dtype)
        direct = _random((1, 2, 8), dtype, gen)
        resident[0:1] = direct.to(resident.device)
        expected[0:1] = direct
        for t in (2, 3):
            value = _random((1, 2, 8), dtype, gen)
            storage.write(resident[t : t + 1], value.to(storage.compute_device))
            expected[t : t + 1] = value
        got = storage.get("cache/r/0/0/v")
        assert _same(got, expected), f"in-place writes not reflected in get (seed {seed})"
        fetched = storage.fetch(got[:4], torch.device(self.compute_device))
        assert _same(fetched, expected[:4]), f"fetch of a prefix differs (seed {seed})"

    # -- fetch -------------------------------------------------------------------------------

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_fetch_to_compute_device(self, storage: StorageBackend, dtype: torch.dtype) -> None:
        gen, seed = fresh_generator()
        x = _random((5, 7), dtype, gen)
        resident = storage.put("w", x)
        device = torch.device(self.compute_device)
        fetched = storage.fetch(resident, device)
        assert fetched.device.type == device.type
        assert _same(fetched, x), f"seed {seed}"
        part = storage.fetch(resident[1:3], device)
        assert _same(part, x[1:3]), f"fetch of a slice differs (seed {seed})"

    def test_release_keeps_the_values(self, storage: StorageBackend) -> None:
        """``release`` is a hint: a released tensor, put or written in place, reads the same when
        fetched again. (256 KiB each: whole pages for a tier that gives pages back.)"""
        gen, seed = fresh_generator()
        x = _random((64, 1024), torch.float32, gen)
        device = torch.device(self.compute_device)
        resident = storage.put("weights/t/layers.0.w", x)
        storage.release(storage.fetch(resident, device))
        storage.release(resident)
        assert _same(storage.fetch(resident, device), x), f"a released tensor changed (seed {seed})"
        written = storage.empty("cache/t/0", (64, 1024), torch.float32)
        storage.write(written, x.to(written.device))
        storage.release(written)
        assert _same(storage.fetch(written, device), x), f"a released tensor written in place changed (seed {seed})"

    # -- free / nbytes / close ---------------------------------------------------------------

    def test_free(self, storage: StorageBackend) -> None:
        storage.empty("scratch", (3,), torch.float32)
        storage.free("scratch")
        assert storage.get("scratch") is None
        x = torch.arange(5, dtype=torch.float16)
        storage.put("kept", x)
        storage.free("kept")
        got = storage.get("kept")
        if type(storage).persistent:
            assert got is not None and _same(got, x), "a persistent backend keeps put tensors across free"
        else:
            assert got is None
        storage.free("never/stored")  # freeing an unknown key is harmless

    def test_nbytes(self, storage: StorageBackend) -> None:
        base = storage.nbytes()
        a = torch.ones(10, 3, dtype=torch.float16)
        storage.put("a", a)
        after_put = storage.nbytes()
        storage.empty("b", (7, 5), torch.float32)
        after_empty = storage.nbytes()
        if self.nbytes_exact:
            assert after_put - base == _bytes(a)
            assert after_empty - after_put == 7 * 5 * 4
        else:
            assert base < after_put < after_empty
        storage.free("a")
        storage.free("b")
        assert storage.nbytes() == base

    def test_close_forgets_scratch(self, storage: StorageBackend) -> None:
        storage.empty("scratch", (3,), torch.float32)
        storage.close()
        assert storage.get("scratch") is None

    def test_persistent_tensors_survive_a_new_instance(self, storage: StorageBackend, tmp_path: Path) -> None:
        if not type(storage).persistent:
            pytest.skip("not a persistent backend")
        gen, seed = fresh_generator()
        x = randn((4, 9), gen, torch.bfloat16)
        storage.put("weights/p/x", x)
        again = self.make_storage(tmp_path)
        try:
            assert _same(again.get("weights/p/x"), x), f"seed {seed}"
        finally:
            again.close()

    def test_unknown_option_is_a_type_error(self, storage: StorageBackend, tmp_path: Path) -> None:
        with pytest.raises(TypeError):
            type(storage)(
                compute_device=self.compute_device, offload_dir=tmp_path, pin_memory=True, no_such_option_xyz=1
            )
