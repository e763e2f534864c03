"""Run the command line in the test process: no interpreter start-up per call."""

from __future__ import annotations


def run_cli_output(argv: list[str], capsys) -> tuple[int, str, str]:
    """`trimode ARGV` in this process (the console script is `main`): its exit status, stdout and
    stderr. Argparse's own errors exit through SystemExit; ours return 2."""
    from trimode.cli import main

    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """`run_cli_output` without stdout: the exit status and stderr."""
    code, _, err = run_cli_output(argv, capsys)
    return code, err
