"""Errors meant for the user: one line naming the problem and the fix. The CLI prints them and exits 2."""


class UserError(Exception):
    pass
