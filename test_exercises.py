"""test_exercises.py: the student copy exercises.py writes (exercises.py check runs the suite on it)."""
import ast

import pytest

import exercises
from exercises import EXERCISES, HERE

# In a student copy the reference bodies these tests cut are not there.
pytestmark = pytest.mark.skipif(bool(exercises.removed()), reason="a student copy (exercises removed: "
                                f"{', '.join(exercises.removed())}); these tests need the reference")


def top_level(source):
    """The module's top-level statements, as text, without the exercise functions."""
    return [ast.dump(node) for node in ast.parse(source).body]


@pytest.mark.parametrize("exercise", EXERCISES, ids=lambda e: e.name)
def test_a_stub_keeps_signature_and_docstring_and_raises_the_exercise(exercise):
    reference = (HERE / exercise.file).read_text()
    student = exercises.stub_source(reference, exercise)
    ref_tree, stu_tree = ast.parse(reference), ast.parse(student)
    for name in exercise.functions:
        ref, stu = exercises.find_function(ref_tree, name), exercises.find_function(stu_tree, name)
        assert ast.dump(ref.args) == ast.dump(stu.args)
        assert ast.get_docstring(ref) == ast.get_docstring(stu)
        after_docstring = lambda f: f.body[1:] if ast.get_docstring(f) else f.body
        (raise_,) = after_docstring(stu)
        assert isinstance(raise_, ast.Raise) and raise_.exc.func.id == "NotImplementedError"
        assert f"exercise {exercise.name}" in raise_.exc.args[0].value
        assert not isinstance(after_docstring(ref)[0], ast.Raise)                  # a real body was removed
    # nothing else in the file changed
    changed = [i for i, (a, b) in enumerate(zip(top_level(reference), top_level(student))) if a != b]
    owners = {name.split(".")[0] for name in exercise.functions}
    assert all(getattr(ast.parse(reference).body[i], "name", None) in owners for i in changed)


def test_make_writes_the_whole_project_with_only_the_chosen_bodies_removed(tmp_path):
    exercises.make(tmp_path / "student", [exercises.BY_NAME["bwt-forgetting"]])
    for path in HERE.glob("*.py"):
        copied = (tmp_path / "student" / path.name).read_text()
        assert (copied == path.read_text()) == (path.name != "metrics.py")
    with pytest.raises(SystemExit, match="not empty"):
        exercises.make(tmp_path / "student", EXERCISES)


def test_unknown_exercises_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        exercises.main(["make", "--out", str(tmp_path / "s"), "no-such-exercise"])
    assert "unknown exercise(s) no-such-exercise" in capsys.readouterr().err


def test_a_student_copy_knows_which_exercises_it_lacks(tmp_path):
    assert exercises.removed() == []
    exercises.make(tmp_path / "student", [exercises.BY_NAME["baseline-3"], exercises.BY_NAME["kb-forward"]])
    assert exercises.removed(tmp_path / "student") == ["kb-forward", "baseline-3"]
