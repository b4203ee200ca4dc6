"""What users import to use a trained model: `RelationExtractor` (a finetune workdir or an export)
and `PrototypeClassifier` (prototypes of the user's own support records, any stage's encoder).
"""
