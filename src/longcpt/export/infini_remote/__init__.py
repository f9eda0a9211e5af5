"""Files copied into every exported Infini folder (`longcpt.export.infini_hf`).

They import only torch and transformers; this package exists so that they are installed with
longcpt and can be linted and tested like the rest of the code.
"""
