"""mcr.retrieve: chunked top-k search (exact, bounded memory), the gallery cache, the CLI."""
import os
import shutil
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mcr import retrieve
from mcr.eval.embedding import embed
from mcr.eval.gallery import search_file, search_working_set_bytes, topk_chunked


def exact_topk(queries, gallery, k):
    """float64 oracle: (scores, indices) of the k best inner products, best first."""
    scores = torch.as_tensor(queries, dtype=torch.float64) @ torch.as_tensor(gallery, dtype=torch.float64).T
    top = scores.topk(min(k, gallery.shape[0]), dim=1)
    return top.values.numpy(), top.indices.numpy()


@pytest.mark.parametrize("num_rows,num_queries,k,chunk_rows", [
    (1, 1, 5, 4), (7, 3, 5, 3), (100, 2, 5, 1), (257, 4, 10, 64), (1000, 1, 1, 999), (50, 2, 7, 4096)])
def test_topk_chunked_matches_the_full_search(num_rows, num_queries, k, chunk_rows):
    gallery = np.random.randn(num_rows, 24).astype(np.float32)
    queries = np.random.randn(num_queries, 24).astype(np.float32)
    scores, index = topk_chunked(queries, lambda a, b: gallery[a:b], num_rows, k, chunk_rows)
    want_scores, want_index = exact_topk(queries, gallery, k)
    assert scores.shape == index.shape == (num_queries, min(k, num_rows))
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_topk_chunked_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k and chunk_rows"):
        topk_chunked(np.ones((1, 4)), lambda a, b: np.ones((b - a, 4)), 3, 0)
    with pytest.raises(ValueError, match=r"\[\*, 4\]"):
        topk_chunked(np.ones((1, 4)), lambda a, b: np.ones((b - a, 5)), 3, 2)


def test_100k_gallery_is_searched_under_the_stated_memory_bound(tmp_path):
    """100,000 random unit embeddings (E = 128, 51 MB on disk) searched by 2 queries 4,096
    rows at a time: tracemalloc's peak (numpy's arrays are traced) stays within
    search_working_set_bytes, a tenth of the gallery, and the answer is the exact top-10."""
    num_rows, dim, chunk_rows, k = 100_000, 128, 4096, 10
    gallery = torch.nn.functional.normalize(torch.randn(num_rows, dim), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(2, dim), dim=1).numpy()
    path = str(tmp_path / "gallery.safetensors")
    save_file({"image": gallery}, path)
    want_scores, want_index = exact_topk(queries, gallery, k)
    del gallery
    tracemalloc.start()
    try:
        scores, index = search_file(path, "image", queries, k, chunk_rows)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    bound = search_working_set_bytes(chunk_rows, dim, 2, k)
    assert peak >= 4 * chunk_rows * dim, "tracemalloc did not see the chunk: the measurement is void"
    assert peak <= bound + 64 * 1024, f"peak {peak} B over the stated bound {bound} B"
    assert bound < num_rows * dim * 4 / 10
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


# --- the CLI on a trained run -------------------------------------------------------------------

@pytest.fixture(scope="module")
def val_embeddings(tiny_run):
    """Reference: the run's val split embedded by the evaluation path in batches of 8 (image, text)."""
    from mcr.run import build_dataset, collate_for, load_trained

    model, cfg, tokenizer, device, _ = load_trained(str(tiny_run))
    dataset = build_dataset(cfg, "val", cfg.val_size)
    image, text, _ = embed(model, dataset, collate_for(cfg, tokenizer), device, batch_size=8)
    return dataset, image, text


def test_image_query_returns_the_top_reports_and_uses_the_cache(tiny_run, val_embeddings, tmp_path, capsys):
    dataset, image, text = val_embeddings
    query = 5
    path = tmp_path / "query.png"
    Image.fromarray(dataset[query].image).save(path)  # lossless at the model's size
    grid = tmp_path / "grid.png"
    results = retrieve.main(["--checkpoint", str(tiny_run), "--image", str(path), "--k", "4", "--grid", str(grid)])
    want_scores, want_index = exact_topk(image[query:query + 1], text, 4)
    assert [i for _, i in results] == want_index[0].tolist()
    np.testing.assert_allclose([s for s, _ in results], want_scores[0], rtol=1e-4, atol=1e-5)
    out = capsys.readouterr().out
    assert "computed and cached" in out and dataset[int(want_index[0, 0])].report in out
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cache = tiny_run / "retrieval" / "synthetic-val-24.safetensors"
    assert cache.is_file()
    again = retrieve.main(["--checkpoint", str(tiny_run), "--image", str(path), "--k", "4"])
    assert again == results and "from the cache" in capsys.readouterr().out


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of the trained run that a test may change (the original is shared)."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("retrieval"))
    return copy


def test_cache_follows_the_checkpoint_content_not_its_mtime(run_copy, capsys):
    args = ["--checkpoint", str(run_copy), "--report", "Small left pleural effusion.", "--k", "3"]
    first = retrieve.main(args)
    assert "computed and cached" in capsys.readouterr().out
    model_file = next((run_copy / "checkpoints").glob("step_*/model.safetensors"))
    stat = os.stat(model_file)
    os.utime(model_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same weights
    assert retrieve.main(args) == first and "from the cache" in capsys.readouterr().out
    weights = load_file(model_file)  # retrained in place: other weights, same size and mtime
    weights = {name: -t if t.is_floating_point() else t for name, t in weights.items()}
    save_file(weights, model_file)
    os.utime(model_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(model_file).st_size == stat.st_size
    retrieve.main(args)
    assert "computed and cached" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_broken_cache_is_recomputed_with_a_warning(run_copy, capsys, damage):
    args = ["--checkpoint", str(run_copy), "--report", "Small left pleural effusion.", "--k", "3"]
    first = retrieve.main(args)
    cache = next((run_copy / "retrieval").glob("*.safetensors"))
    data = cache.read_bytes()
    cache.write_bytes({"truncated": data[:len(data) // 2], "garbage": b"\x00junk" * 99, "empty": b""}[damage])
    capsys.readouterr()
    assert retrieve.main(args) == first
    captured = capsys.readouterr()
    assert "computed and cached" in captured.out and "unreadable" in captured.err and str(cache) in captured.err
    assert retrieve.main(args) == first and "from the cache" in capsys.readouterr().out


def png_header(width, height):
    """A PNG that holds only its header: PIL opens it (width x height), decoding it fails."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) \
        + chunk(b"IEND", b"")


def test_report_query_returns_the_top_images(tiny_run, val_embeddings, capsys):
    dataset, image, text = val_embeddings
    query = 11
    results = retrieve.main(["--checkpoint", str(tiny_run), "--report", dataset[query].report, "--k", "3"])
    want_scores, want_index = exact_topk(text[query:query + 1], image, 3)
    assert [i for _, i in results] == want_index[0].tolist()
    np.testing.assert_allclose([s for s, _ in results], want_scores[0], rtol=1e-4, atol=1e-5)
    assert "top 3 images" in capsys.readouterr().out


def test_folder_gallery(tiny_run, val_embeddings, tmp_path, capsys):
    dataset, _, _ = val_embeddings
    folder = tmp_path / "archive"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(dataset[i].image).save(folder / f"study{i}.png")
    (folder / "study0.txt").write_text(dataset[0].report)
    (folder / "notes.md").write_text("not an image")
    results = retrieve.main(["--checkpoint", str(tiny_run), "--report", dataset[1].report, "--gallery", str(folder)])
    assert sorted(i for _, i in results) == [0, 1, 2]
    assert "study1.png" in capsys.readouterr().out
    results = retrieve.main(["--checkpoint", str(tiny_run), "--image", str(folder / "study2.png"),
                             "--gallery", str(folder), "--k", "2"])
    assert len(results) == 2
    bare = tmp_path / "bare"
    bare.mkdir()
    Image.fromarray(dataset[0].image).save(bare / "a.png")
    with pytest.raises(SystemExit) as err:
        retrieve.main(["--checkpoint", str(tiny_run), "--image", str(bare / "a.png"), "--gallery", str(bare)])
    assert err.value.code == 2 and "--gallery" in capsys.readouterr().err


def test_junk_in_a_folder_gallery_is_skipped_with_reasons(tiny_run, val_embeddings, tmp_path, capsys):
    dataset, _, _ = val_embeddings
    folder = tmp_path / "junk"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(dataset[i].image).save(folder / f"study{i}.png")
    (folder / "notes.png").write_text("a text file named .png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "x.png").mkdir()
    os.symlink("loop.png", folder / "loop.png")  # a link to itself
    (folder / "bomb.png").write_bytes(png_header(30_000, 30_000))  # 900 M pixels: PIL's bomb limit
    (folder / "header_only.png").write_bytes(png_header(8, 8))  # opens, does not decode
    results = retrieve.main(["--checkpoint", str(tiny_run), "--report", dataset[1].report, "--gallery", str(folder),
                             "--k", "10"])
    out = capsys.readouterr().out
    assert len(results) == 3, results  # the three studies only, never the undecodable one
    assert "3 kept" in out and "2 skipped: not a file" in out and "3 skipped: not a readable image" in out
    assert "1 skipped: unreadable image at load time (e.g. header_only.png)" in out
    for shown in ("study0.png", "study1.png", "study2.png"):
        assert shown in out


@pytest.mark.parametrize("flags,named", [
    (["--report", "x", "--k", "0"], "--k"),
    (["--report", "   "], "--report"),
    (["--image", "/nonexistent.png"], "--image"),
    (["--report", "x", "--gallery", "nowhere"], "--gallery"),
    (["--report", "x", "--grid", "out.jpg"], "--grid"),
    (["--report", "x", "--chunk-rows", "0"], "--chunk-rows"),
    (["--report", "x", "--gallery-size", "-1"], "--gallery-size"),
])
def test_bad_input_exits_2_naming_the_flag(tiny_run, capsys, flags, named):
    with pytest.raises(SystemExit) as err:
        retrieve.main(["--checkpoint", str(tiny_run), *flags])
    assert err.value.code == 2 and named in capsys.readouterr().err


def test_bad_checkpoint_and_unreadable_image_exit_2(tiny_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        retrieve.main(["--checkpoint", str(tmp_path), "--report", "x"])
    assert err.value.code == 2 and "--checkpoint" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(SystemExit) as err:
        retrieve.main(["--checkpoint", str(tiny_run), "--image", str(broken)])
    assert err.value.code == 2 and "--image" in capsys.readouterr().err
