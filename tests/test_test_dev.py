"""test.py on a COCO test-dev style split: images and categories, no annotations, images in test2017/."""
import json
import shutil

from datasets.coco_eval import settings_hash
from tests.test_test_cli import RACCOON, cli_args, ckpt_dir, test_cli  # noqa: F401 (ckpt_dir is a fixture)


def test_test_dev_writes_server_results(ckpt_dir, tmp_path, capsys):  # noqa: F811
    data = json.loads((RACCOON / "annotations" / "instances_val.json").read_text())
    info = {"info": {}, "images": data["images"], "categories": data["categories"]}  # as image_info_*.json
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "image_info_test-dev2017.json").write_text(json.dumps(info))
    (tmp_path / "test2017").mkdir()
    for im in info["images"]:
        shutil.copy(RACCOON / "val" / im["file_name"], tmp_path / "test2017")

    args = cli_args(ckpt_dir, "--test_flip", "--test_scales", "0.5,1")
    args.data_dir, args.val_split = str(tmp_path), "test-dev2017"
    assert test_cli.main(args) == {}
    printed = capsys.readouterr().out
    assert "AP comes from the COCO evaluation server" in printed
    assert "Average Precision" not in printed and "-1.000" not in printed
    out = ckpt_dir / "tiny" / f"detections_test-dev2017_tiny-checkpoint-s50-100-flip-{settings_hash({'topk': 20})}" \
                              "_results.json"
    results = json.loads(out.read_text())
    ids = {im["id"] for im in info["images"]}
    assert results and all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in results)
    assert {r["image_id"] for r in results} <= ids and all(r["category_id"] == 1 for r in results)
    assert all(len(r["bbox"]) == 4 for r in results)
