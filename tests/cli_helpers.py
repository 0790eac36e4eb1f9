"""Running the CLI in-process and checking its one-line errors (shared by the CLI-level tests)."""

from foldgpt.cli.main import main


def run_cli(capsys, *argv):
    """Exit status, stdout and stderr of ``foldgpt ARGV`` run in this process."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *phrases):
    """Exit status 2, exactly one ``foldgpt: error:`` line holding every phrase, and no traceback."""
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("foldgpt:")]
    assert len(lines) == 1 and lines[0].startswith("foldgpt: error: "), err
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
