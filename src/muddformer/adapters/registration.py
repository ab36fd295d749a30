"""Our model types in transformers' Auto classes, without importing transformers before it is needed.

transformers takes seconds to import, and training, the data tools and most commands never use it. So
`import muddformer` registers at once only where transformers is already loaded; otherwise a finder
waits on `sys.meta_path` and registers right after transformers' own import, whichever code imports it.
Either way `AutoConfig` / `AutoModelForCausalLM` / `AutoTokenizer` know our folders before anyone can
call them.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings


def _register() -> None:
    import muddformer.adapters.hf  # noqa: F401  (registers on import)


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        # Every lookup gets a wrapped loader, a mere probe (`importlib.util.find_spec`, as accelerate and
        # lm-eval make) included: only the import that executes the package registers and retires the finder.
        for finder in sys.meta_path:
            spec = None if finder is self else finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            try:
                _register()
            except Exception as err:  # never break the user's `import transformers`; MuddForCausalLM re-raises it
                warnings.warn(f"muddformer could not register its model types with transformers: {err}", stacklevel=2)

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def register_with_transformers() -> None:
    """Register now if transformers is loaded, else as soon as it is."""
    if "transformers" in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTransformers())
