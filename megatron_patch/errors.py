"""Errors meant for the user: one line naming the problem and the fix. The CLI prints them and exits 2."""


class UserError(Exception):
    pass


def exception_chain(err: BaseException) -> list[BaseException]:
    """`err` and everything it wraps: causes, contexts, and the per-rank failures torch DCP collects in a
    CheckpointException (`failures`: rank -> exception, or (exception, traceback))."""
    seen, stack, found = set(), [err], []
    while stack:
        e = stack.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        found.append(e)
        stack += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():
            stack.append(failure[0] if isinstance(failure, tuple) else failure)
    return found
