"""trident.fsutil: folders that are swapped in whole, and scratch folders that do not pile up."""
import pytest

from trident.fsutil import replace_dir, scratch_dir


def test_a_scratch_dir_is_removed_after_a_run_and_kept_with_its_logs_after_a_failure(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    with scratch_dir("run-") as work:
        (work / "triton.log").write_text("fine")
        assert work.parent == tmp_path and work.name.startswith("run-")
    assert not work.exists()
    with pytest.raises(RuntimeError):
        with scratch_dir("run-") as failed:
            (failed / "triton.log").write_text("what went wrong")
            raise RuntimeError("the server did not start")
    assert (failed / "triton.log").read_text() == "what went wrong"
    assert f"logs kept in {failed}" in capsys.readouterr().err


def test_replace_dir_swaps_in_whole_or_leaves_the_old_folder(tmp_path):
    out = tmp_path / "repo"
    with replace_dir(out) as tmp:
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1"
    with pytest.raises(ValueError):
        with replace_dir(out) as tmp:
            (tmp / "b").write_text("2")
            raise ValueError("half-written")
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # no leftover beside it
