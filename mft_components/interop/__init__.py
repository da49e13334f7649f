"""Interoperability with other fine-tuning tools' files.

    mftcoder_keys.py  the table of MFTCoder's train-config keys and what each becomes in mft
    mftcoder.py       `mft import mftcoder CONFIG.json`: read, translate, write a commented mft config
"""
