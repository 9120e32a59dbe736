"""Data layer: tokenizers, documents, indexed datasets, calibration samples, GPTDataset loader."""

import json
import os

import numpy
import pytest
import torch

from conftest import tiny_text
from megatron_minitron import cli, parallel
from megatron_minitron.data import (
    MegatronTokenizer,
    MicroBatchSampler,
    build_gpt_datasets,
    build_indexed_dataset,
    calibration_samples,
    check_tokenizer_fits,
    eos_id,
    iter_documents,
    load_tokenizer,
    micro_batches,
    open_indexed_dataset,
    token_stream,
    tokenize_documents,
)
from megatron_minitron.errors import UsageError
from megatron_minitron.testing import spawn


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of 30 text documents and a JSON lines file of 10 more (key "body")."""
    root = tmp_path_factory.mktemp("corpus")
    docs = root / "docs"
    (docs / "sub").mkdir(parents=True)
    for index in range(30):
        folder = docs / "sub" if index % 3 == 0 else docs
        (folder / f"doc{index:02d}.txt").write_text(tiny_text(40 + 7 * index, seed=100 + index))
    (docs / ".hidden.txt").write_text("never read")
    (docs / "blob.bin").write_bytes(b"\0\1\2binary")
    records = [{"body": tiny_text(50 + index, seed=200 + index), "id": index}
               for index in range(10)]
    jsonl = root / "more.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    return {"docs": str(docs), "jsonl": str(jsonl)}


@pytest.fixture(scope="module")
def prefix(corpus, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("indexed") / "data" / "corpus"
    build_indexed_dataset([corpus["docs"], corpus["jsonl"]], tokenizer, str(out), json_key="body")
    return str(out)


def expected_stream(corpus, tokenizer):
    documents = iter_documents([corpus["docs"], corpus["jsonl"]], json_key="body")
    return [ids for ids in tokenize_documents(documents, tokenizer, eos_id(tokenizer))]


# ---------------------------------------------------------------- tokenizer and documents


def test_load_tokenizer_from_folder_and_checkpoint(tiny_tokenizer_dir, tokenizer, tmp_path):
    checkpoint = tmp_path / "ckpt"
    (checkpoint / "minitron_config.json").parent.mkdir()
    (checkpoint / "minitron_config.json").write_text("{}")
    os.symlink(tiny_tokenizer_dir, checkpoint / "tokenizer")
    from_checkpoint = load_tokenizer(str(checkpoint))
    assert len(from_checkpoint) == len(tokenizer) == 300
    assert eos_id(from_checkpoint) == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    with pytest.raises(UsageError, match="holds no tokenizer"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(UsageError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing"))


def test_tokenizer_larger_than_vocab_is_a_usage_error(tokenizer):
    check_tokenizer_fits(tokenizer, 300)
    with pytest.raises(UsageError, match="tokenizer has 300 tokens but the model's vocab_size is "
                                         "299"):
        check_tokenizer_fits(tokenizer, 299)


def test_documents_from_folders_and_json_lines(corpus, tmp_path):
    documents = list(iter_documents([corpus["docs"], corpus["jsonl"]], json_key="body"))
    assert len(documents) == 40  # 30 files (hidden and binary skipped) + 10 records
    assert documents[-1] == tiny_text(59, seed=209)
    with pytest.raises(UsageError, match="has no key 'text'"):
        list(iter_documents(corpus["jsonl"]))
    with pytest.raises(UsageError, match="does not exist"):
        list(iter_documents(str(tmp_path / "missing.txt")))


# ---------------------------------------------------------------- indexed datasets


def test_indexed_round_trip_equals_token_stream(corpus, tokenizer, prefix):
    documents = expected_stream(corpus, tokenizer)
    dataset = open_indexed_dataset(prefix)
    assert len(dataset) == len(documents) == 40
    assert dataset.index.dtype == numpy.uint16
    for index, ids in enumerate(documents):
        assert dataset[index].tolist() == ids
        assert ids[-1] == eos_id(tokenizer)
    numpy.testing.assert_array_equal(token_stream(prefix), numpy.concatenate(documents))
    assert sorted(os.listdir(os.path.dirname(prefix))) == ["corpus.bin", "corpus.idx"]


def test_preprocess_command_with_workers_matches(corpus, tiny_tokenizer_dir, prefix, tmp_path):
    out = str(tmp_path / "cli")
    code = cli.main(["preprocess-data", "--input", corpus["docs"], corpus["jsonl"],
                     "--json-key", "body", "--tokenizer", tiny_tokenizer_dir,
                     "--output-prefix", out, "--workers", "2"])
    assert code == 0
    for suffix in (".bin", ".idx"):
        with open(out + suffix, "rb") as mine, open(prefix + suffix, "rb") as reference:
            assert mine.read() == reference.read()
    code = cli.main(["preprocess-data", "--input", str(tmp_path / "missing"), "--tokenizer",
                     tiny_tokenizer_dir, "--output-prefix", out])
    assert code == 2


def test_empty_input_writes_nothing(tokenizer, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UsageError, match="hold no text"):
        build_indexed_dataset(str(empty), tokenizer, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["empty.txt"]


# ---------------------------------------------------------------- calibration samples


def test_calibration_samples_are_seeded_disjoint_windows(corpus, tokenizer, prefix):
    stream = numpy.concatenate(expected_stream(corpus, tokenizer))
    seq_length = 15
    samples = calibration_samples(data_prefix=prefix, num_samples=20, seq_length=seq_length,
                                  seed=7)
    assert samples.shape == (20, seq_length + 1) and samples.dtype == torch.int64
    windows = torch.from_numpy(stream[:len(stream) // 16 * 16].astype(numpy.int64)).view(-1, 16)
    positions = [int(torch.nonzero((windows == row).all(1))[0]) for row in samples]
    assert len(set(positions)) == 20  # distinct, hence non-overlapping, windows
    again = calibration_samples(text_file=[corpus["docs"]], tokenizer=tokenizer, num_samples=5,
                                seq_length=seq_length, seed=7)
    assert torch.equal(again, calibration_samples(text_file=[corpus["docs"]],
                                                  tokenizer=tokenizer, num_samples=5,
                                                  seq_length=seq_length, seed=7))
    other = calibration_samples(data_prefix=prefix, num_samples=20, seq_length=seq_length,
                                seed=8)
    assert not torch.equal(samples, other)


def test_calibration_data_too_short_or_empty(tokenizer, tmp_path, prefix):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UsageError, match="is empty"):
        calibration_samples(text_file=str(empty), tokenizer=tokenizer, num_samples=1,
                            seq_length=8)
    short = tmp_path / "short.txt"
    short.write_text("the model prunes heads")
    with pytest.raises(UsageError, match=r"calibration data has \d+ tokens, need "
                                         r"num_samples\*\(seq_length\+1\)=4\*9=36"):
        calibration_samples(text_file=str(short), tokenizer=tokenizer, num_samples=4,
                            seq_length=8)
    with pytest.raises(UsageError, match="exactly one source"):
        calibration_samples(text_file=str(short), data_prefix=prefix, num_samples=1,
                            seq_length=8)
    with pytest.raises(UsageError, match="needs a tokenizer"):
        calibration_samples(text_file=str(short), num_samples=1, seq_length=8)


@pytest.mark.parametrize("num_samples,mbs,dp,pad", [(12, 2, 3, False), (12, 4, 1, False),
                                                    (11, 2, 3, True), (2, 1, 4, True)])
def test_dp_shares_partition_the_samples(num_samples, mbs, dp, pad):
    samples = torch.arange(num_samples * 9).view(num_samples, 9)
    shares = [micro_batches(samples, mbs, rank, dp, pad_remainder=pad) for rank in range(dp)]
    assert len({len(share) for share in shares}) == 1  # same number of micro-batches per rank
    rows, labels, masks = [], [], []
    for share in shares:
        for batch in share:
            assert batch["tokens"].shape == (mbs, 8)
            rows.append(batch["tokens"])
            labels.append(batch["labels"])
            masks.append(batch["loss_mask"])
    rows, labels, masks = torch.cat(rows), torch.cat(labels), torch.cat(masks)
    real = masks[:, 0] == 1
    assert torch.equal(rows[real], samples[:, :-1])  # every sample once, in order
    assert torch.equal(labels[real], samples[:, 1:])
    assert masks.sum() == num_samples * 8


def test_uneven_micro_batches_without_padding_are_a_usage_error():
    with pytest.raises(UsageError, match="use a multiple of 6 samples"):
        micro_batches(torch.zeros(11, 9, dtype=torch.long), 2, 0, 3)


# ---------------------------------------------------------------- GPTDataset training data


def test_gpt_dataset_loader_shifts_labels_and_resumes(prefix, tokenizer, tmp_path):
    datasets = build_gpt_datasets([prefix], tokenizer, seq_length=16, train_samples=48,
                                  split="90,10,0", seed=3, cache_dir=str(tmp_path / "cache"))
    assert datasets.test is None and len(datasets.valid) > 0
    full = {rank: list(MicroBatchSampler(datasets.train, 2, rank, 2)) for rank in (0, 1)}
    assert len(full[0]) == len(full[1]) == len(datasets.train) // 4
    for batch in full[0] + full[1]:
        assert batch["tokens"].shape == batch["labels"].shape == (2, 16)
        assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
    sampler = MicroBatchSampler(datasets.train, 2, 1, 2, consumed_samples=12)
    assert sampler.consumed_samples == 12 and len(sampler) == len(full[1]) - 3
    for step, batch in enumerate(sampler, start=3):
        assert torch.equal(batch["tokens"], full[1][step]["tokens"])
        assert sampler.consumed_samples == (step + 1) * 4
    # global order: one rank with micro-batches of 4 sees both ranks' samples
    single = list(MicroBatchSampler(datasets.train, 4, consumed_samples=8))
    assert torch.equal(single[0]["tokens"],
                       torch.cat([full[0][2]["tokens"], full[1][2]["tokens"]]))
    again = build_gpt_datasets(" ".join([prefix]), tokenizer, seq_length=16, train_samples=48,
                               split="90,10,0", seed=3, cache_dir=str(tmp_path / "cache"))
    assert torch.equal(list(MicroBatchSampler(again.train, 2, 1, 2))[5]["labels"],
                       full[1][5]["labels"])


def _rank_batches(prefix, megatron_tokenizer, cache, out):
    from megatron_minitron import adapter

    layout = parallel.initialize(1, 1)
    datasets = build_gpt_datasets([prefix], megatron_tokenizer, seq_length=16,
                                  train_samples=48, split="90,10,0", seed=3, cache_dir=cache)
    sampler = MicroBatchSampler(datasets.train, 2, adapter.parallel_state
                                .get_data_parallel_rank(), layout.dp, consumed_samples=8)
    torch.save([batch["tokens"] for batch in sampler], f"{out}.{parallel.rank()}")


def test_gpt_datasets_on_two_ranks_split_the_global_order(prefix, tokenizer, tmp_path):
    cache, out = str(tmp_path / "cache"), str(tmp_path / "tokens")
    spawn(_rank_batches, 2, prefix, MegatronTokenizer(tokenizer), cache, out)  # rank 0 builds
    single = build_gpt_datasets([prefix], tokenizer, seq_length=16, train_samples=48,
                                split="90,10,0", seed=3, cache_dir=cache)
    reference = list(MicroBatchSampler(single.train, 4, consumed_samples=8))
    ranks = [torch.load(f"{out}.{rank}") for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(reference) > 0
    for step, batch in enumerate(reference):
        assert torch.equal(batch["tokens"], torch.cat([ranks[0][step], ranks[1][step]]))


def test_blended_gpt_datasets(prefix, tokenizer, tmp_path):
    blend = ["0.3", prefix, "0.7", prefix]
    with pytest.raises(UsageError, match="weighted blend needs the number of valid samples"):
        build_gpt_datasets(blend, tokenizer, seq_length=16, train_samples=20, split="90,10,0")
    datasets = build_gpt_datasets(blend, tokenizer, seq_length=16, train_samples=20,
                                  valid_samples=4, split="90,10,0",
                                  cache_dir=str(tmp_path / "cache"))
    assert len(datasets.train) == 20 and len(datasets.valid) >= 4  # mcore rounds per dataset up
    batch = next(iter(MicroBatchSampler(datasets.train, 4)))
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
    with pytest.raises(UsageError, match="not found"):
        build_gpt_datasets([str(tmp_path / "nope")], tokenizer, seq_length=16, train_samples=1)


# ---------------------------------------------------------------- real text, real tokenizer


def test_kernel_docs_with_smollm2_tokenizer(linux_doc, smollm2_tokenizer, tmp_path):
    check_tokenizer_fits(smollm2_tokenizer, 49152)
    folder = os.path.join(linux_doc, "process")
    out = str(tmp_path / "process")
    stats = build_indexed_dataset(folder, smollm2_tokenizer, out)
    assert stats.documents > 30 and stats.tokens > 100_000
    first = next(iter_documents(folder))
    dataset = open_indexed_dataset(out)
    assert dataset[0].tolist() == smollm2_tokenizer(first, add_special_tokens=False)[
        "input_ids"] + [eos_id(smollm2_tokenizer)]
    samples = calibration_samples(data_prefix=out, num_samples=16, seq_length=128, seed=0)
    assert samples.shape == (16, 129) and int(samples.max()) < 49152
    text = smollm2_tokenizer.decode(samples[0])
    assert sum(c.isalpha() for c in text) > len(text) / 2  # English prose, not noise
