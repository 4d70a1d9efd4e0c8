"""Reading one flag off a command line before the host's parser sees it."""

from titan_objectives.config import ObjectivesConfigError


def flag_value(argv: list[str], names: tuple[str, ...]) -> str | None:
    """The value of the last of ``names`` on ``argv`` (``--flag value`` or
    ``--flag=value``), or None. A flag without its value is an error naming it."""
    value = None
    for i, arg in enumerate(argv):
        key, eq, inline = arg.partition("=")
        if key in names:
            if eq:
                value = inline
            elif i + 1 < len(argv):
                value = argv[i + 1]
            else:
                raise ObjectivesConfigError(f"{key} needs a value")
    return value


def without_flag(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``argv`` with every ``names`` flag and its value left out."""
    rest: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        key, eq, _ = arg.partition("=")
        if key in names:
            skip = not eq
            continue
        rest.append(arg)
    return rest
