"""What train.py does with the validation numbers (a planted bug that read AP50 as the AP, and one that replaced
best.pt on an equal AP, went unnoticed: a briefly trained network scores 0 on every metric). The epochs' training
is skipped and validation returns fixed numbers, so only the bookkeeping is under test."""
import pytest

import train
from engine import trainer
from utils.checkpoint import load_checkpoint


# with the training skipped, the scheduler steps without an optimizer step, which torch warns about
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_the_ap_is_returned_and_best_pt_changes_only_for_a_higher_one(shapes_dir, tmp_path, monkeypatch):
    validations = iter([{"AP": 0.3, "AP50": 0.6}, {"AP": 0.3, "AP50": 0.7}])
    monkeypatch.setattr(trainer, "evaluate", lambda *args, **kwargs: next(validations))
    monkeypatch.setattr(trainer, "val_images", lambda *args, **kwargs: [])
    monkeypatch.setattr(trainer, "train_one_epoch", lambda *args, **kwargs: False)  # False: no stop was asked
    args = train.get_args_parser().parse_args([
        "--log_name", "run", "--ckpt_dir", str(tmp_path), "--data_dir", str(shapes_dir), "--train_split", "train",
        "--val_split", "val", "--arch", "tiny_hourglass", "--img_size", "127", "--batch_size", "4",
        "--num_workers", "0", "--device", "cpu", "--num_epochs", "2", "--val_interval", "1"])
    assert train.main(args) == pytest.approx(0.3)
    last, best = (load_checkpoint(tmp_path / "run" / name) for name in ("checkpoint.pt", "best.pt"))
    assert last["epoch"] == 2 and last["best_ap"] == pytest.approx(0.3)
    assert best["epoch"] == 1  # the second 0.3 is no improvement
    assert "epoch 2: val AP 0.3000" in (tmp_path / "run" / "train.log").read_text()
