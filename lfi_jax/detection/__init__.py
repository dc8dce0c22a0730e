"""Detection: box ops, the Hungarian matcher, DETR's set criterion and postprocessing to COCO results."""
