"""LaMP personal data: task registry (prompts, labels, metrics) and validated file loading."""

from .lamp import LampDataset, UserRecord, load_lamp, load_outputs, load_questions, read_json
from .tasks import TASKS, TaskSpec, get_task, task_names

SAMPLE_TASKS = ("LaMP-1", "LaMP-2", "LaMP-3", "LaMP-4", "LaMP-5", "LaMP-7")


def sample_paths(task: str) -> tuple[str, str]:
    """(questions, outputs) of the synthetic sample data that ships with the package."""
    from importlib import resources

    spec = get_task(task)
    root = resources.files("cdcda_export") / "assets" / "lamp_sample" / spec.name
    return str(root / "questions.json"), str(root / "outputs.json")


__all__ = ["LampDataset", "UserRecord", "load_lamp", "load_outputs", "load_questions", "read_json",
           "TASKS", "TaskSpec", "get_task", "task_names", "sample_paths", "SAMPLE_TASKS"]
