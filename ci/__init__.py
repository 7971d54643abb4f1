"""The CI gate: every check an architecture must pass before a team admits it, as Markdown and JUnit XML."""
