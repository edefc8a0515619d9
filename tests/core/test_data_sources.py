"""data.path formats (parquet, csv, data-file folders, hub names from an offline cache), verl's column layout,
`datasets` objects and the streamed sampler (issue 16, item 1)."""
from __future__ import annotations

import glob
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from align.config import DataConfig
from align.data import PromptDataset, read_records
from align.errors import UserError

ROWS = [{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(5)]  # strings: csv infers no other type


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), str(path))


def test_parquet_and_csv_files(tmp_path):
    write_parquet(tmp_path / "p.parquet", ROWS)
    (tmp_path / "c.csv").write_text("prompt,answer\n" + "".join(f"{r['prompt']},{r['answer']}\n" for r in ROWS))
    assert read_records(str(tmp_path / "p.parquet")) == ROWS
    assert read_records(str(tmp_path / "c.csv")) == ROWS
    with pytest.raises(UserError, match=r"'.*nope.parquet' does not exist"):
        read_records(str(tmp_path / "nope.parquet"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UserError, match=r"unknown file type '.txt'"):
        read_records(str(tmp_path / "x.txt"))


def test_folder_of_data_files_takes_data_split(tmp_path):
    """verl's preprocessing writes train.parquet and test.parquet side by side; data.split picks one."""
    write_parquet(tmp_path / "train.parquet", ROWS[:3])
    write_parquet(tmp_path / "test.parquet", ROWS[3:])
    assert read_records(str(tmp_path)) == ROWS[:3]
    assert read_records(str(tmp_path), split="test") == ROWS[3:]
    with pytest.raises(UserError, match=r"no split 'dev' \(splits: .*train.*\); set data.split"):
        read_records(str(tmp_path), split="dev")


def test_hub_name_from_an_offline_cache(tmp_path, monkeypatch):
    """A hub name resolves through `datasets`' own cache with HF_HUB_OFFLINE=1 and HF_HOME in a temp dir.

    The cache is what `load_dataset("someone/toy")` leaves after a download: written by datasets' own parquet
    builder from a local file (no network here), then filed under the hub name's directory
    (`someone___toy/default/...`) as the hub path names it."""
    import datasets
    from datasets.packaged_modules.parquet.parquet import Parquet

    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")  # read at import: follow HF_HOME
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    src = tmp_path / "train.parquet"
    write_parquet(src, ROWS)
    Parquet(cache_dir=str(home / "datasets"), dataset_name="toy", config_name="default",
            data_files={"train": [str(src)]}, hash="0123abcd").download_and_prepare()
    src.unlink()  # the data now lives only in the cache
    (home / "datasets" / "someone___toy").mkdir()
    built = glob.glob(str(home / "datasets" / "toy" / "default-*"))[0]
    shutil.move(built, home / "datasets" / "someone___toy" / "default")
    assert read_records("someone/toy") == ROWS
    with pytest.raises(UserError, match=r"cannot load dataset 'someone/absent' .*Hugging Face cache"):
        read_records("someone/absent")
    assert os.environ["HF_HUB_OFFLINE"] == "1"


VERL_ROWS = [{"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": f"{i}+1="}], "ability": "math",
              "reward_model": {"style": "rule", "ground_truth": str(i + 1)},
              "extra_info": {"split": "train", "index": i}} for i in range(4)]


def test_verl_parquet_layout_unchanged(tmp_path):
    """verl's rows: the message-list prompt goes through the chat template, reward_model.ground_truth is the
    `ground_truth` column math_verify reads, data_source / extra_info stay columns."""
    from align.testing import make_char_tokenizer

    write_parquet(tmp_path / "train.parquet", VERL_ROWS)
    ds = PromptDataset(DataConfig(path=str(tmp_path / "train.parquet")), make_char_tokenizer())
    assert [r["ground_truth"] for r in ds.records] == ["1", "2", "3", "4"]
    assert [r["data_source"] for r in ds.records] == ["openai/gsm8k"] * 4
    assert ds.records[2]["extra_info"] == {"split": "train", "index": 2}
    assert {"ground_truth", "data_source", "extra_info", "reward_model"} <= set(ds.columns)
    text = ds.prompt_text(ds.records[0])
    assert "0+1=" in text and text != "0+1="  # the tokenizer's chat template wrapped it


def test_dataset_objects_and_bad_types():
    import datasets

    from align.data import load_source

    cfg = DataConfig(path="<dataset argument>")
    assert PromptDataset(cfg, source=datasets.Dataset.from_list(ROWS)).records == ROWS
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]), "test": datasets.Dataset.from_list(ROWS[2:])})
    assert PromptDataset(DataConfig(path="x", split="test"), source=dd).records == ROWS[2:]
    with pytest.raises(UserError, match=r"^dataset= must be a datasets.Dataset.*; got dict$"):
        PromptDataset(cfg, source={"prompt": ["a"] * 1000})
    with pytest.raises(UserError, match=r"pass the same dataset again"):
        load_source("<dataset argument>")


def test_stream_sampler_epochs_and_resume():
    import datasets

    from align.data import StreamSampler

    rows = [{"prompt": f"p{i}", "id": i} for i in range(7)]
    stream = datasets.Dataset.from_list(rows).to_iterable_dataset()
    ds = PromptDataset(DataConfig(path="<dataset argument>"), source=stream)
    assert ds.records is None and ds.columns == ["id", "prompt"]
    s = StreamSampler(ds, seed=3)
    first = [r["id"] for r in s.next(7)]
    assert sorted(first) == list(range(7)) and first != list(range(7))  # one epoch: a shuffled permutation
    s.next(4)
    state = s.state_dict()
    b = s.next(5)  # crosses into epoch 2
    s2 = StreamSampler(ds, seed=3)
    s2.load_state_dict(state)
    assert state == {"epoch": 1, "index": 4} and s2.next(5) == b
    plain = StreamSampler(ds, seed=3, shuffle=False)
    assert [r["id"] for r in plain.next(9)] == [0, 1, 2, 3, 4, 5, 6, 0, 1]


def test_dataset_object_as_data_path_is_one_line():
    import datasets

    import align
    from align.errors import ConfigError

    ds = datasets.Dataset.from_list(ROWS * 20)
    with pytest.raises(ConfigError) as err:
        align.GRPOConfig(model={"path": "m"}, data={"path": ds}, reward={"functions": ["math_verify"]})
    assert str(err.value) == ("data.path = <Dataset> must be a string; pass a dataset object as "
                              "align.train(config, dataset=...)")
