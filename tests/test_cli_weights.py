"""`drpo weights` writes the figure and prints the weight table."""

import pytest

from drpo.cli import main


def test_weights_writes_png_and_table(tmp_path, capsys):
    out = tmp_path / "w.png"
    assert main(["weights", "--out", str(out), "--mu", "0.5", "0.1"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg

    img = mpimg.imread(out)
    assert img.shape[0] > 300 and img.shape[1] > 600
    text = capsys.readouterr().out
    # DRPO at mu=0.5, D=+0.10 with delta=0.15: w = 1 - 0.10/0.15 = 0.333
    drpo_row = next(line for line in text.splitlines() if line.startswith("drpo ") and " 0.5 " in line)
    assert "0.333" in drpo_row
    # SPO at mu=0.1, D=+0.10, eps=0.15: w = 1 - (0.1/0.1)/0.15 = -5.667
    spo_row = next(line for line in text.splitlines() if line.startswith("spo ") and " 0.1 " in line)
    assert "-5.667" in spo_row


def test_weights_rejects_bad_mu(tmp_path):
    with pytest.raises(SystemExit, match="--mu values must lie in"):
        main(["weights", "--out", str(tmp_path / "x.png"), "--mu", "1.5"])
