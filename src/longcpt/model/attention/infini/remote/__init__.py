"""Files copied into every exported Infini folder (`longcpt.model.attention.infini.export`).

They import only torch and transformers; this package exists so that they are installed with
longcpt and can be linted and tested like the rest of the code.
"""
