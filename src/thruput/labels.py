"""The label convention every part of thruput shares.

``IGNORE_INDEX`` marks a position that has no target (padding, a document's last token):
torch's ``F.cross_entropy`` default and transformers' ``-100``, so batches, losses and peers agree.
"""
IGNORE_INDEX = -100
