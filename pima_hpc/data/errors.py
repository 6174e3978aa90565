"""The one exception a user can cause through data: a bad file, array, path or argument.

Every :class:`DataError` message is a single line that names the file (or array), the dataset
inside it where relevant, what is wrong, and the fix. The CLI prints it and exits 2; internal
invariants use ``assert`` instead, because they are bugs, not user errors.
"""

from __future__ import annotations

from pima_hpc.errors import DataError

__all__ = ["DataError"]
