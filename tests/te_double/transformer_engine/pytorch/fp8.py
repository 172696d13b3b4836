"""FP8 state: the double never runs in FP8. Asking for it is an error, not a silent full-precision run."""
import contextlib


class FP8GlobalStateManager:
    @classmethod
    def is_fp8_enabled(cls) -> bool:
        return False

    @classmethod
    def is_fp8_calibration(cls) -> bool:
        return False

    @classmethod
    def with_fp8_parameters(cls) -> bool:
        return False

    @classmethod
    def with_high_precision_init_val(cls) -> bool:
        return False

    @classmethod
    def get_fp8_recipe(cls):
        return None


@contextlib.contextmanager
def fp8_autocast(enabled: bool = True, calibrating: bool = False, fp8_recipe=None, fp8_group=None, **_):
    if enabled or calibrating:
        raise NotImplementedError("te_double: FP8 execution is not emulated (run with fp8 off)")
    yield


@contextlib.contextmanager
def fp8_model_init(enabled: bool = True, **_):
    if enabled:
        raise NotImplementedError("te_double: FP8 parameters are not emulated (run with fp8 off)")
    yield
