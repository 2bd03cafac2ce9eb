"""Downloads and loaders of MNIST and CIFAR-10 (arcsim.tasks.download, arcsim.tasks.datasets).

No network is reachable in CI: the downloads fetch small generated files in the official formats
(IDX .gz files, a cifar-10-binary.tar.gz of binary batches) from a local HTTP server on 127.0.0.1
or from file:// URLs, with those files' checksums passed in.
"""

from __future__ import annotations

import doctest
import functools
import gzip
import hashlib
import http.server
import io
import struct
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from arcsim import cli
from arcsim.tasks import build_model, load_dataset
from arcsim.tasks import datasets as datasets_module
from arcsim.tasks import download as download_module
from arcsim.tasks.datasets import (
    CIFAR10_FILES,
    DatasetUnavailable,
    download_cifar10,
    download_dataset,
    download_mnist,
    read_cifar_batch,
)
from arcsim.tasks.download import DownloadFailed, extract_members, fetch_verified

IDX_STEMS = datasets_module.FASHION_MNIST_FILES
RECORD = 1 + 3 * 32 * 32

# ------------------------------------------------------------------------------------------------
# generated files in the official formats


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist_server(folder: Path) -> dict[str, str]:
    """Four small MNIST .gz archives (train: 20 images, test: 5); return the archives' SHA-256s."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": np.concatenate([np.zeros((10, 28, 28)), np.full((10, 28, 28), 255)]),
        "train-labels-idx1-ubyte": np.arange(20) % 10,
        "t10k-images-idx3-ubyte": np.full((5, 28, 28), 51),
        "t10k-labels-idx1-ubyte": np.arange(5),
    }
    sums = {}
    for stem, array in arrays.items():
        archive = gzip.compress(idx_bytes(np.asarray(array)), mtime=0)
        (folder / f"{stem}.gz").write_bytes(archive)
        sums[stem] = hashlib.sha256(archive).hexdigest()
    return sums


def cifar_batch(labels: list[int], *, red: int = 10, green: int = 20, blue: int = 30) -> bytes:
    """Records whose planes are constant, plus the record index in the first red pixel."""
    records = []
    for i, label in enumerate(labels):
        planes = np.stack([np.full((32, 32), red), np.full((32, 32), green), np.full((32, 32), blue)])
        planes[0, 0, 0] = i
        records.append(bytes([label]) + planes.astype(np.uint8).tobytes())
    return b"".join(records)


def cifar_batches() -> dict[str, bytes]:
    """Five train batches of 4 records (labels 0..9 cycling) and a test batch of 3, colours varying."""
    batches = {
        f"data_batch_{k}.bin": cifar_batch(
            [(4 * (k - 1) + i) % 10 for i in range(4)], red=10 * k, green=20 * k, blue=250 - 10 * k
        )
        for k in range(1, 6)
    }
    batches["test_batch.bin"] = cifar_batch([7, 8, 9], red=60, green=120, blue=180)
    return batches


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_cifar_server(folder: Path, batches: dict[str, bytes] | None = None) -> tuple[str, dict[str, str]]:
    """The archive laid out like the official one; return its SHA-256 and the batches' SHA-256s."""
    folder.mkdir(parents=True, exist_ok=True)
    batches = cifar_batches() if batches is None else batches
    members = {f"cifar-10-batches-bin/{name}": data for name, data in batches.items()}
    members["cifar-10-batches-bin/batches.meta.txt"] = b"airplane\nautomobile\n"
    members["cifar-10-batches-bin/readme.html"] = b"<html></html>"
    archive = tar_gz(members)
    (folder / "cifar-10-binary.tar.gz").write_bytes(archive)
    return hashlib.sha256(archive).hexdigest(), {n: hashlib.sha256(d).hexdigest() for n, d in batches.items()}


# ------------------------------------------------------------------------------------------------
# a local HTTP server


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        pass


class _TruncatingHandler(_QuietHandler):
    """Announces the whole file's Content-Length but sends half of it, then drops the connection."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True


def serve(folder: Path, handler: type[http.server.SimpleHTTPRequestHandler]) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1, and its base URL."""
    folder = tmp_path / "www"
    folder.mkdir()
    yield from ((folder, url) for url in serve(folder, _QuietHandler))


@pytest.fixture
def truncating_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """Like http_root, but every response stops halfway through its announced length."""
    folder = tmp_path / "www-truncating"
    folder.mkdir()
    yield from ((folder, url) for url in serve(folder, _TruncatingHandler))


@pytest.fixture
def no_downloaded_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty ARCSIM_DATA and an empty user cache; return the ARCSIM_DATA folder."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "no-cache"))
    monkeypatch.setenv("ARCSIM_DATA", str(empty))
    return empty


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------------
# fetch_verified and extract_members


def test_download_module_docstring_example_runs() -> None:
    result = doctest.testmod(download_module)
    assert (result.attempted > 0, result.failed) == (True, 0)


def test_fetch_verified_over_http_keeps_the_verified_file(http_root: tuple[Path, str], tmp_path: Path) -> None:
    # Prepare
    folder, url = http_root
    (folder / "a.bin").write_bytes(b"x" * 100_000)

    # Execute
    target = fetch_verified(
        url + "a.bin", tmp_path / "a.bin", expected_sha256=hashlib.sha256(b"x" * 100_000).hexdigest()
    )

    # Assert
    assert target.read_bytes() == b"x" * 100_000
    assert listing(tmp_path) == ["a.bin", "www"]


def test_fetch_verified_interrupted_leaves_nothing_behind(tmp_path: Path) -> None:
    # Prepare: a Ctrl-C while the file is being checked, after it has fully arrived
    (tmp_path / "src").write_bytes(b"data")

    def interrupt(path: Path) -> str:
        raise KeyboardInterrupt

    # Execute
    with pytest.raises(KeyboardInterrupt):
        fetch_verified((tmp_path / "src").as_uri(), tmp_path / "dst", expected_sha256="0" * 64, digest=interrupt)

    # Assert
    assert listing(tmp_path) == ["src"]


def test_extract_members_writes_only_the_named_regular_files_inside_dest(tmp_path: Path) -> None:
    # Prepare: a member that climbs out of the folder, one in a subfolder, one not asked for
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_gz({"../../escape/one.bin": b"1", "sub/two.bin": b"2", "three.bin": b"3"}))
    dest = tmp_path / "dest"
    dest.mkdir()

    # Execute
    written = extract_members(archive, dest, ["one.bin", "two.bin"])

    # Assert: matched by base name, written into dest and nowhere else
    assert sorted(p.name for p in written) == ["one.bin", "two.bin"]
    assert listing(dest) == ["one.bin", "two.bin"]
    assert (dest / "one.bin").read_bytes() == b"1"
    assert not (tmp_path.parent / "escape").exists()


def test_extract_members_refuses_a_link_standing_for_a_member(tmp_path: Path) -> None:
    # Prepare: two.bin is a symbolic link to a file outside, not a regular file
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("one.bin")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"1"))
        link = tarfile.TarInfo("two.bin")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(buffer.getvalue())
    dest = tmp_path / "dest"
    dest.mkdir()

    # Execute
    with pytest.raises(DownloadFailed, match="lacks two.bin"):
        extract_members(archive, dest, ["one.bin", "two.bin"])

    # Assert: all or nothing
    assert listing(dest) == []


def test_extract_members_refuses_a_corrupt_archive(tmp_path: Path) -> None:
    # Prepare: the first half of a valid archive
    data = tar_gz({"one.bin": bytes(range(256)) * 400})
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(data[: len(data) // 2])
    dest = tmp_path / "dest"
    dest.mkdir()

    # Execute / Assert
    with pytest.raises(DownloadFailed, match="cannot extract"):
        extract_members(archive, dest, ["one.bin"])
    assert listing(dest) == []


# ------------------------------------------------------------------------------------------------
# MNIST: download


def test_download_mnist_over_http_then_load_it(
    http_root: tuple[Path, str], tmp_path: Path, no_downloaded_data: Path
) -> None:
    # Prepare
    folder, url = http_root
    sums = write_mnist_server(folder)

    # Execute
    dest = download_mnist(tmp_path / "data" / "mnist", base_urls=(url,), sha256=sums)
    ds = load_dataset("mnist", root=tmp_path / "data")

    # Assert
    assert listing(dest) == sorted(f"{stem}.gz" for stem in IDX_STEMS)
    assert (ds.name, ds.input_shape, ds.num_classes) == ("mnist", (1, 28, 28), 10)
    assert (tuple(ds.train_y.shape), tuple(ds.test_y.shape)) == ((20,), (5,))
    # train pixels are half 0 and half 255: mean 0.5, std 0.5 after scaling, so they become -1 and 1
    assert set(ds.train_x.unique().tolist()) == {-1.0, 1.0}
    assert ds.test_y.tolist() == [0, 1, 2, 3, 4]


def test_download_mnist_falls_back_to_the_next_mirror(http_root: tuple[Path, str], tmp_path: Path) -> None:
    # Prepare: the first mirror answers 404, the second serves the files
    folder, url = http_root
    sums = write_mnist_server(folder / "mirror")

    # Execute
    dest = download_mnist(tmp_path / "mnist", base_urls=(url + "gone/", url + "mirror/"), sha256=sums)

    # Assert
    assert listing(dest) == sorted(f"{stem}.gz" for stem in IDX_STEMS)


def test_download_mnist_refuses_a_checksum_mismatch_and_keeps_nothing(
    http_root: tuple[Path, str], tmp_path: Path
) -> None:
    # Prepare: the table pins other bytes than the server sends for the training images
    folder, url = http_root
    sums = write_mnist_server(folder)
    sums["train-images-idx3-ubyte"] = hashlib.sha256(b"the real archive").hexdigest()

    # Execute
    with pytest.raises(DatasetUnavailable, match="checksum mismatch") as info:
        download_mnist(tmp_path / "mnist", base_urls=(url,), sha256=sums)

    # Assert: the message names the file and the command; no unverified file under any name
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message and "arcsim data download mnist" in message
    assert "\n" not in message
    assert listing(tmp_path / "mnist") == []


def test_download_mnist_refuses_a_truncated_transfer(truncating_root: tuple[Path, str], tmp_path: Path) -> None:
    # Prepare
    folder, url = truncating_root
    sums = write_mnist_server(folder)

    # Execute
    with pytest.raises(DatasetUnavailable, match="could not download .*stopped after [0-9]+ of [0-9]+ bytes"):
        download_mnist(tmp_path / "mnist", base_urls=(url,), sha256=sums)

    # Assert
    assert listing(tmp_path / "mnist") == []


def test_download_mnist_replaces_a_partial_file_and_a_stale_part(http_root: tuple[Path, str], tmp_path: Path) -> None:
    # Prepare: an earlier interrupted copy left half an archive and a .part file
    folder, url = http_root
    sums = write_mnist_server(folder)
    dest = tmp_path / "mnist"
    dest.mkdir()
    whole = (folder / "train-images-idx3-ubyte.gz").read_bytes()
    (dest / "train-images-idx3-ubyte.gz").write_bytes(whole[: len(whole) // 2])
    (dest / "t10k-images-idx3-ubyte.gz.part").write_bytes(b"stale")

    # Execute
    download_mnist(dest, base_urls=(url,), sha256=sums)

    # Assert
    assert (dest / "train-images-idx3-ubyte.gz").read_bytes() == whole
    assert listing(dest) == sorted(f"{stem}.gz" for stem in IDX_STEMS)


def test_download_mnist_keeps_verified_files_without_the_network(http_root: tuple[Path, str], tmp_path: Path) -> None:
    # Prepare: download once
    folder, url = http_root
    sums = write_mnist_server(folder)
    download_mnist(tmp_path / "mnist", base_urls=(url,), sha256=sums)

    # Execute: no server at all the second time
    dest = download_mnist(tmp_path / "mnist", base_urls=((tmp_path / "nowhere").as_uri(),), sha256=sums)

    # Assert
    assert len(listing(dest)) == 4


def test_download_dataset_and_the_command_use_the_injected_tables(
    http_root: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: the module's URL and checksum tables point at the local server
    folder, url = http_root
    monkeypatch.setattr(datasets_module, "MNIST_SHA256", write_mnist_server(folder))
    monkeypatch.setattr(datasets_module, "MNIST_URLS", (url,))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    # Execute
    default = download_dataset("mnist")
    status = cli.main(["data", "download", "mnist", "--dest", str(tmp_path / "elsewhere")])

    # Assert: the default folder is the one the loader searches
    assert default == tmp_path / "cache" / "arcsim" / "mnist"
    assert len(listing(default)) == 4
    assert status == 0 and len(listing(tmp_path / "elsewhere")) == 4
    assert "mnist downloaded and verified" in capsys.readouterr().out


def test_download_dataset_rejects_a_name_it_cannot_download(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match="cannot download dataset 'digits'; downloadable: fashion-mnist, mnist, cifar-10"
    ):
        download_dataset("digits", tmp_path)


def test_the_command_refuses_a_failed_download_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: the only CIFAR-10 source does not exist
    monkeypatch.setattr(datasets_module, "CIFAR10_URL", (tmp_path / "nowhere.tar.gz").as_uri())

    # Execute
    status = cli.main(["data", "download", "cifar-10", "--dest", str(tmp_path / "cifar")])

    # Assert
    err = capsys.readouterr().err
    assert status != 0
    assert err.startswith("arcsim: error: could not download") and err.count("\n") == 1
    assert listing(tmp_path / "cifar") == []


# ------------------------------------------------------------------------------------------------
# MNIST: loading


def test_mnist_is_not_taken_from_a_bare_data_root(tmp_path: Path, no_downloaded_data: Path) -> None:
    # Prepare: IDX files directly in the root could be Fashion-MNIST's; torchvision's layout is MNIST's
    write_mnist_server(tmp_path / "data")

    # Execute / Assert
    with pytest.raises(DatasetUnavailable):
        load_dataset("mnist", root=tmp_path / "data")
    write_mnist_server(tmp_path / "data" / "MNIST" / "raw")
    assert load_dataset("mnist", root=tmp_path / "data").input_shape == (1, 28, 28)


def test_mnist_is_found_in_arcsim_data(tmp_path: Path, no_downloaded_data: Path) -> None:
    # Prepare
    write_mnist_server(no_downloaded_data / "mnist")

    # Execute
    ds = load_dataset("mnist")

    # Assert
    assert tuple(ds.train_x.shape) == (20, 1, 28, 28)


def test_missing_mnist_names_the_command_and_the_offline_fallback(no_downloaded_data: Path) -> None:
    # Execute
    with pytest.raises(DatasetUnavailable) as info:
        load_dataset("mnist")

    # Assert
    message = str(info.value)
    assert message.startswith("MNIST not found") and "\n" not in message
    assert "arcsim data download mnist" in message and "mnist-5k" in message
    assert str(no_downloaded_data / "mnist") in message


def test_mnist_with_a_label_out_of_range_is_rejected(tmp_path: Path, no_downloaded_data: Path) -> None:
    # Prepare
    folder = tmp_path / "data" / "mnist"
    write_mnist_server(folder)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.array([0, 1, 2, 3, 10]))))

    # Execute / Assert
    with pytest.raises(DatasetUnavailable, match="t10k labels reach 10, MNIST has 10 classes"):
        load_dataset("mnist", root=tmp_path / "data")


# ------------------------------------------------------------------------------------------------
# CIFAR-10: download


def test_download_cifar10_over_http_extracts_the_six_batches(http_root: tuple[Path, str], tmp_path: Path) -> None:
    # Prepare
    folder, url = http_root
    archive_sum, batch_sums = write_cifar_server(folder)

    # Execute
    dest = download_cifar10(
        tmp_path / "cifar", url=url + "cifar-10-binary.tar.gz", archive_sha256=archive_sum, batch_sha256=batch_sums
    )

    # Assert: the batches only (no readme, no meta), the archive removed
    assert listing(dest) == sorted(CIFAR10_FILES)
    assert (dest / "test_batch.bin").read_bytes() == cifar_batches()["test_batch.bin"]


def test_download_cifar10_refuses_an_archive_checksum_mismatch(http_root: tuple[Path, str], tmp_path: Path) -> None:
    # Prepare
    folder, url = http_root
    _, batch_sums = write_cifar_server(folder)

    # Execute
    with pytest.raises(DatasetUnavailable, match="checksum mismatch .*arcsim data download cifar-10"):
        download_cifar10(
            tmp_path / "cifar", url=url + "cifar-10-binary.tar.gz", archive_sha256="0" * 64, batch_sha256=batch_sums
        )

    # Assert
    assert listing(tmp_path / "cifar") == []


def test_download_cifar10_refuses_a_truncated_transfer(truncating_root: tuple[Path, str], tmp_path: Path) -> None:
    # Prepare
    folder, url = truncating_root
    archive_sum, batch_sums = write_cifar_server(folder)

    # Execute
    with pytest.raises(DatasetUnavailable, match="could not download"):
        download_cifar10(
            tmp_path / "cifar", url=url + "cifar-10-binary.tar.gz", archive_sha256=archive_sum, batch_sha256=batch_sums
        )

    # Assert
    assert listing(tmp_path / "cifar") == []


@pytest.mark.parametrize(
    ("fault", "message"),
    [("no test batch", "lacks test_batch.bin"), ("wrong batch sum", "data_batch_3.bin do not match")],
)
def test_download_cifar10_refuses_a_verified_archive_with_bad_batches(tmp_path: Path, fault: str, message: str) -> None:
    # Prepare: an archive that verifies but lacks a batch, or whose batch is not the pinned one
    batches = cifar_batches()
    if fault == "no test batch":
        del batches["test_batch.bin"]
    archive_sum, batch_sums = write_cifar_server(tmp_path / "www", batches)
    batch_sums |= {"test_batch.bin": "0" * 64} if fault == "no test batch" else {"data_batch_3.bin": "0" * 64}

    # Execute
    with pytest.raises(DatasetUnavailable, match=message):
        download_cifar10(
            tmp_path / "cifar",
            url=(tmp_path / "www" / "cifar-10-binary.tar.gz").as_uri(),
            archive_sha256=archive_sum,
            batch_sha256=batch_sums,
        )

    # Assert: no batch and no downloaded archive left
    assert listing(tmp_path / "cifar") == []


def test_download_cifar10_keeps_verified_batches_and_a_placed_archive(tmp_path: Path) -> None:
    # Prepare: the user put the official archive in the folder; there is no network
    archive_sum, batch_sums = write_cifar_server(tmp_path / "cifar")
    nowhere = (tmp_path / "nowhere.tar.gz").as_uri()

    # Execute: the first call extracts from the placed archive, the second finds verified batches
    download_cifar10(tmp_path / "cifar", url=nowhere, archive_sha256=archive_sum, batch_sha256=batch_sums)
    (tmp_path / "cifar" / "cifar-10-binary.tar.gz").unlink()
    dest = download_cifar10(tmp_path / "cifar", url=nowhere, archive_sha256=archive_sum, batch_sha256=batch_sums)

    # Assert
    assert listing(dest) == sorted(CIFAR10_FILES)


# ------------------------------------------------------------------------------------------------
# CIFAR-10: loading


def test_cifar10_loads_32x32x3_standardised_per_channel(tmp_path: Path, no_downloaded_data: Path) -> None:
    # Prepare: the archive's own folder name under the data root
    folder = tmp_path / "data" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for name, data in cifar_batches().items():
        (folder / name).write_bytes(data)

    # Execute
    ds = load_dataset("cifar-10", root=tmp_path / "data")

    # Assert
    assert (ds.name, ds.input_shape, ds.num_classes) == ("cifar-10", (3, 32, 32), 10)
    assert (tuple(ds.train_x.shape), tuple(ds.test_x.shape)) == ((20, 3, 32, 32), (3, 3, 32, 32))
    assert ds.train_y.tolist() == [i % 10 for i in range(20)] and ds.test_y.tolist() == [7, 8, 9]
    per_channel = ds.train_x.double().transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(dim=1), torch.zeros(3, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(per_channel.std(dim=1, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-5)
    # blue is 240, 230, 220, 210, 200 in equal shares in train (mean 220, std sqrt(200)); the test blue is 180
    assert ds.test_x[0, 2, 5, 5].item() == pytest.approx((180 - 220) / 200**0.5, rel=1e-5)


def test_read_cifar_batch_keeps_the_record_layout(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "b.bin"
    path.write_bytes(cifar_batch([3, 4], red=1, green=2, blue=3))

    # Execute
    pixels, labels = read_cifar_batch(path)

    # Assert: red plane first, rows top to bottom, the record index in pixel (0, 0) of red
    assert labels.tolist() == [3, 4]
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == np.uint8
    assert (pixels[1, 0, 0, 0], pixels[1, 0, 0, 1], pixels[1, 1, 31, 31], pixels[1, 2, 0, 0]) == (1, 1, 2, 3)


@pytest.mark.parametrize("size", [0, RECORD - 1, 2 * RECORD + 5])
def test_read_cifar_batch_rejects_partial_records(tmp_path: Path, size: int) -> None:
    # Prepare
    path = tmp_path / "b.bin"
    path.write_bytes(bytes(size))

    # Execute / Assert
    with pytest.raises(ValueError, match=f"b.bin: {size} bytes is not a whole number of 3073-byte"):
        read_cifar_batch(path)


def test_cifar10_with_a_truncated_batch_says_to_replace_it(tmp_path: Path, no_downloaded_data: Path) -> None:
    # Prepare
    folder = no_downloaded_data / "cifar-10"
    folder.mkdir()
    for name, data in cifar_batches().items():
        (folder / name).write_bytes(data[:-7] if name == "data_batch_2.bin" else data)

    # Execute / Assert
    with pytest.raises(DatasetUnavailable, match=r"data_batch_2.bin: .*Replace the file"):
        load_dataset("cifar-10")


def test_cifar10_with_a_label_out_of_range_is_rejected(tmp_path: Path, no_downloaded_data: Path) -> None:
    # Prepare
    folder = no_downloaded_data / "cifar-10"
    folder.mkdir()
    batches = cifar_batches()
    batches["test_batch.bin"] = cifar_batch([7, 10])
    for name, data in batches.items():
        (folder / name).write_bytes(data)

    # Execute / Assert
    with pytest.raises(DatasetUnavailable, match="test labels reach 10, CIFAR-10 has 10 classes"):
        load_dataset("cifar-10")


def test_missing_cifar10_names_the_command(no_downloaded_data: Path) -> None:
    # Execute
    with pytest.raises(DatasetUnavailable) as info:
        load_dataset("cifar-10")

    # Assert
    message = str(info.value)
    assert message.startswith("CIFAR-10 not found") and "\n" not in message
    assert "arcsim data download cifar-10" in message
    assert str(no_downloaded_data / "cifar-10-batches-bin") in message


@pytest.mark.parametrize("model", ["cnn", "mlp", "logreg"])
def test_built_in_models_take_cifar10_inputs(model: str) -> None:
    # Execute
    net = build_model(model, input_shape=(3, 32, 32), num_classes=10, seed=0)
    out = net(torch.zeros(2, 3, 32, 32))

    # Assert: log-probabilities of 10 classes
    assert tuple(out.shape) == (2, 10)
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(2))
