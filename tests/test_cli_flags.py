"""Flag parsing, without running anything: the flags land where the library reads them, defaults are the library's."""

import dataclasses

import pytest

from soppu_hub import cli
from soppu_hub.compression.config import CompressConfig
from soppu_hub.compression.export import ExportConfig
from soppu_hub.errors import SoppuError
from soppu_hub.pipeline.job import JobSpec


def spec(*argv):
    args = cli.build_parser().parse_args(["compress", *argv])
    args.argv = ["compress", *argv]
    return cli.job_spec(args)


def test_defaults_are_the_librarys_own():
    s = spec("alice/a")
    assert s.config == CompressConfig() and s.export == ExportConfig()
    library = JobSpec(sources=["alice/a"])
    for f in dataclasses.fields(JobSpec):
        if f.name not in ("command",):
            assert getattr(s, f.name) == getattr(library, f.name), f.name


def test_every_flag_lands_in_the_spec(tmp_path):
    listed = tmp_path / "loras.txt"
    listed.write_text("# mine\nalice/b\n\n./c\n")
    s = spec(
        "alice/a",
        "--sources-file",
        str(listed),
        "--rank",
        "24",
        "--method",
        "diag",
        "--weighting",
        "none",
        "--clusters",
        "auto",
        "--target-error",
        "0.1",
        "--tol",
        "1e-4",
        "--max-iter",
        "50",
        "--device",
        "cpu",
        "--no-pad",
        "--lorax-tp",
        "4",
        "--export-dtype",
        "bf16",
        "--out",
        "out",
        "--no-push",
        "--push-to",
        "org/x",
        "--namespace",
        "org",
        "--private",
        "--revision",
        "v2",
        "--token",
        "hf_secret",
        "--overwrite",
        "--verify",
        "--base-model",
        "m/base",
        "--verify-ranks",
        "8,16",
        "--workers",
        "3",
    )
    assert s.sources == ["alice/a", "alice/b", "./c"]
    assert s.config == CompressConfig(
        rank=24, method="diag", device="cpu", weighting="none", tol=1e-4, max_iter=50, clusters="auto", target_error=0.1
    )
    assert s.export == ExportConfig(pad=False, lorax_tp=4, dtype="bf16")
    assert (s.out.name, s.push, s.push_to, s.namespace, s.private, s.revision, s.token, s.overwrite) == (
        "out",
        False,
        "org/x",
        "org",
        True,
        "v2",
        "hf_secret",
        True,
    )
    assert (s.verify, s.base_model, s.verify_ranks, s.workers) == (True, "m/base", [8, 16], 3)
    assert "hf_secret" not in s.command and s.command.startswith("soppu-hub compress alice/a")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--verify-ranks", "8"], "--verify-ranks needs --verify"),
        (["--verify", "--verify-ranks", "8,x"], "comma-separated positive integers"),
        (["--verify", "--verify-ranks", "0"], "comma-separated positive integers"),
    ],
)
def test_bad_verify_ranks_are_user_errors(argv, message):
    with pytest.raises(SoppuError, match=message):
        spec("alice/a", *argv)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "svd"], "invalid choice: 'svd'"),
        (["--rank", "x"], "invalid int value: 'x'"),
        (["--export-dtype", "int8"], "invalid choice: 'int8'"),
    ],
)
def test_malformed_flags_are_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.main(["compress", "alice/a", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err and "--help" in err


def test_only_soppu_errors_are_user_errors(monkeypatch, capsys):
    """A ValueError from torch or PEFT is a bug to report (exit 1), not a mistake of the user's (exit 2)."""
    from soppu_hub.pipeline import job

    def boom(*a, **k):
        raise ValueError("shapes (3,4) and (5,6) not aligned")

    monkeypatch.setattr(job, "run_job", boom)
    assert cli.main(["compress", "alice/a", "--no-push", "--out", "x"]) == 1
    assert "unexpected ValueError" in capsys.readouterr().err
    monkeypatch.setattr(job, "run_job", lambda *a, **k: (_ for _ in ()).throw(SoppuError("fix this")))
    assert cli.main(["compress", "alice/a", "--no-push", "--out", "x"]) == 2
    assert capsys.readouterr().err == "error: fix this\n"
