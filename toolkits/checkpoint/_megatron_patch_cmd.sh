# Sourced by the wrappers here: MP=(the megatron-patch command). $PYTHON -m megatron_patch.cli when PYTHON
# is set, else the installed console script, else python3 -m megatron_patch.cli.
if [ -n "${PYTHON:-}" ]; then
    MP=("$PYTHON" -m megatron_patch.cli)
elif command -v megatron-patch >/dev/null 2>&1; then
    MP=(megatron-patch)
else
    MP=(python3 -m megatron_patch.cli)
fi
