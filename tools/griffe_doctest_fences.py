"""griffe extension for the docs site: a docstring's `>>>` examples (prompt, continuation and output
lines, up to a blank line) become fenced `pycon` blocks, so that the free-style docstrings render them
as code instead of Markdown block quotes."""
import griffe


def fence_doctests(text: str) -> str:
    out, block = [], []
    for line in text.splitlines() + [""]:
        stripped = line.lstrip()
        if block and stripped:
            block.append(line)
            continue
        if block:  # a blank line ends the example
            indent = block[0][: len(block[0]) - len(block[0].lstrip())]
            out += [indent + "```pycon"] + block + [indent + "```"]
            block = []
        if stripped.startswith(">>>"):
            block.append(line)
        else:
            out.append(line)
    return "\n".join(out[:-1])


class DoctestFences(griffe.Extension):
    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
