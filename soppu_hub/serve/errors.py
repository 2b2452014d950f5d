"""The backend's refusals, each carrying LoRAX's status code and error_type (a failed generation is 424)."""


class ServeError(Exception):
    """Carries the LoRAX error class: status code and error_type (a failed generation is 424, as in LoRAX)."""

    status = 424
    error_type = "generation"


class ValidationFailed(ServeError):
    status, error_type = 422, "validation"


class AdapterLoadFailed(ServeError):
    status, error_type = 424, "generation"


class Overloaded(ServeError):
    status, error_type = 429, "overloaded"


class Forbidden(ServeError):
    """An admin route asked without its token (or, with none set, from another machine)."""

    status, error_type = 403, "forbidden"
